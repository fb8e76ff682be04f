"""Batched, sharded text generation on top of `LoopCoder.prefill` / `LoopCoder.decode_step`.

Two compiled programs per request shape, and no host round trip per token:
  1. prefill: the right-padded prompts [B, T] -> last-token logits [B, V] and the LoopCache
     (DESIGN.md "Incremental decoding": a loop-0 KV cache over the context plus, per loop >= 1,
     a ring buffer of the last W tokens);
  2. the decode loop: a `lax.while_loop` on device that samples a token per row, feeds it to
     `decode_step`, and stops when every row has produced an EOS id or `max_new_tokens`.
Tokens stream to the host (optional) through `jax.debug.callback`, which does not stall the loop.

Sharding: the batch is split over the data axes, KV heads and weights over `tensor` / `fsdp`,
all through the logical rules of `sharding.py` (the cache by `cache.CACHE_AXES`). The same
code runs on one device (a 1x1x1 mesh) and on any mesh whose axes divide the model's heads.

Public API:
  generate(cfg, params, prompt_ids, max_new_tokens, *, temperature, top_k, top_p, eos_ids, seed)
  Engine, get_engine  -- the compiled engine (reuse it across calls; `get_engine` caches one)
  Sampling, INSTRUCT_SAMPLING, sample_tokens, top_k_filter, top_p_filter  -- the samplers

Shape legend as in model/loopcoder.py; in addition N is the number of new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopcoder_jax import kernels
from loopcoder_jax import sharding as sh
from loopcoder_jax.cache import CACHE_AXES, LoopCache, cache_bytes
from loopcoder_jax.config import ModelConfig, RuntimeConfig

log = logging.getLogger(__name__)
_DEFAULT_RUNTIME = RuntimeConfig()  # float32 compute and params


class GenerationError(ValueError):
    """Bad generation input (prompt, checkpoint, mesh); the message says what and how to fix."""


# ------------------------------------------------------------------------------------ sampling
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits (applied in HF order: T, top-k, top-p).

    temperature: 0 = greedy (argmax; top_k/top_p are then irrelevant).
    top_k: keep only the k most likely tokens (None = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (None = all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise GenerationError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}."
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise GenerationError(f"top_k must be a positive integer or None, got {self.top_k!r}.")
        if self.top_p is not None and not 0.0 < float(self.top_p) <= 1.0:
            raise GenerationError(f"top_p must lie in (0, 1] or be None, got {self.top_p!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# Model card defaults for the Instruct models (DESIGN.md §5).
INSTRUCT_SAMPLING = Sampling(temperature=0.6, top_k=20, top_p=0.85)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """[..., V] logits with everything below the k-th largest set to -inf (ties at it kept)."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """[..., V] logits outside the nucleus set to -inf.

    The nucleus is the smallest prefix of the tokens sorted by probability whose total reaches
    p; the most likely token is always kept, so p -> 0 becomes greedy.
    """
    srt = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    probs = jax.nn.softmax(srt.astype(jnp.float32), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = before < p
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_tokens(keys: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Chooses one token per row. keys: [B] PRNG keys; logits: [B, V] float -> [B] int32."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        # Filter and sample among the k candidates only: O(V) per step instead of a V-sort.
        vals, idx = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))  # [B, k]
        if sampling.top_p is not None:
            vals = top_p_filter(vals, sampling.top_p)
        choice = jax.vmap(jax.random.categorical)(keys, vals)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if sampling.top_p is not None:
        logits = top_p_filter(logits, sampling.top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class Generation:
    """What `Engine.generate` returns.

    tokens: per prompt, the new token ids (ending with the EOS id when one stopped the row).
    finish_reasons: per prompt, "stop" (an EOS id was generated) or "length".
    stats: cache_bytes, batch (after padding to the data axes), prompt_tokens, new_tokens,
      compile_s (ahead-of-time compilation of a new shape; 0 once compiled), prefill_s and
      decode_s (execution only), prefill_tok_s, decode_tok_s.
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: dict


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _logical_spec(axes) -> PartitionSpec:
    return PartitionSpec(*axes)


def _rules_for_mesh(rules: sh.Rules, mesh: Mesh) -> sh.Rules:
    """Drops mesh axes the mesh does not have (e.g. `sequence`), so any mesh can be used."""

    def keep(target):
        if target is None:
            return None
        if isinstance(target, str):
            return target if target in mesh.axis_names else None
        kept = tuple(a for a in target if a in mesh.axis_names)
        return kept or None

    return tuple((name, keep(target)) for name, target in rules)


def single_device_mesh() -> Mesh:
    """A 1x1x1 mesh on the first local device: the unsharded case runs the sharded code."""
    return Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1, 1), sh.MESH_AXES[:3])


# ------------------------------------------------------------------------------------ engine
class Engine:
    """Compiled prefill + on-device decode loop for one (config, runtime, mesh, rules).

    Reuse one engine across calls (`get_engine` keeps one per settings): its two programs are
    compiled ahead of time once per (batch bucket, prompt bucket, new-token bucket, sampling,
    streaming) and kept.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        runtime: RuntimeConfig = _DEFAULT_RUNTIME,
        mesh: Mesh | None = None,
        rules: sh.Rules = sh.FSDP_TP,
        *,
        length_bucket: int = 64,
    ):
        from loopcoder_jax.checkpoint import abstract_params  # local: keeps import graph flat
        from loopcoder_jax.model import LoopCoder

        self.cfg, self.runtime = cfg, runtime
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.rules = _rules_for_mesh(rules, self.mesh)
        self.length_bucket = length_bucket
        platform = np.asarray(self.mesh.devices).flat[0].platform
        self.decode_block = kernels.decode_block(runtime.decode_block, platform=platform)
        self.model = LoopCoder(cfg, runtime)
        self._check_mesh()

        boxed = abstract_params(cfg, runtime, boxed=True)
        self.abstract_params = nn.unbox(boxed)
        self.param_shardings = sh.param_shardings(boxed, self.mesh, self.rules)
        self._check_divisible(self.abstract_params, self.param_shardings)
        self.cache_shardings = sh.logical_to_mesh_sharding(
            jax.tree.map(_logical_spec, CACHE_AXES, is_leaf=lambda x: isinstance(x, tuple)),
            self.mesh,
            self.rules,
        )
        batch_axes = nn.logical_to_mesh_axes((sh.BATCH,), self.rules)[0]
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._row = NamedSharding(self.mesh, PartitionSpec(batch_axes))  # [B]
        self._rows2 = NamedSharding(self.mesh, PartitionSpec(batch_axes, None))  # [B, X]
        if batch_axes is None:
            self.data_parallel = 1
        else:
            names = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
            self.data_parallel = math.prod(self.mesh.shape[a] for a in names)

        self._compiled = {}  # shape/static key -> AOT-compiled executable
        self._stream_lock = threading.Lock()
        self._stream_fn: Callable | None = None
        self._stream_next, self._stream_pending = 0, {}
        self._prefill = jax.jit(
            self._prefill_impl,
            static_argnums=(3,),
            in_shardings=(self.param_shardings, self._rows2, self._row),
            out_shardings=(self._rows2, self.cache_shardings),
        )
        self._decode = jax.jit(
            self._decode_impl,
            static_argnames=("buffer", "sampling", "stream", "collect_logits"),
            # Outputs are small ([B, N] ids); replicated, every process can read them.
            out_shardings=self._replicated,
        )

    # -------------------------------------------------------------- checks
    def _check_mesh(self):
        cfg = self.cfg
        tensor_axes = nn.logical_to_mesh_axes((sh.KV_HEADS,), self.rules)[0]
        if tensor_axes is None:
            return
        names = (tensor_axes,) if isinstance(tensor_axes, str) else tensor_axes
        size = math.prod(self.mesh.shape[a] for a in names)
        for what, n in (
            ("num_key_value_heads", cfg.num_key_value_heads),
            ("num_attention_heads", cfg.num_attention_heads),
        ):
            if n % size:
                divisors = [d for d in range(1, n + 1) if n % d == 0]
                raise GenerationError(
                    f"The mesh splits heads {size} ways over {names}, but the model has "
                    f"{what}={n}. Use a mesh whose {'x'.join(names)} size divides {n} "
                    f"(one of {divisors}) and put the remaining devices on `data`/`fsdp`."
                )

    def _check_divisible(self, abstract, shardings):
        def check(path, leaf, sharding):
            spec = sharding.spec
            for dim, axes in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim, strict=False):
                if axes is None:
                    continue
                names = (axes,) if isinstance(axes, str) else axes
                size = math.prod(self.mesh.shape[a] for a in names)
                if dim % size:
                    raise GenerationError(
                        f"Parameter {jax.tree_util.keystr(path)} {leaf.shape} cannot be split "
                        f"{size} ways over mesh axes {names} (dimension {dim}); pick a mesh "
                        "whose axis sizes divide the model's dimensions."
                    )

        jax.tree_util.tree_map_with_path(check, abstract, shardings)

    def check_params(self, params) -> None:
        """Raises `GenerationError` unless `params` has exactly the tree and shapes of cfg."""
        want = jax.tree_util.tree_flatten_with_path(self.abstract_params)[0]
        try:
            got = jax.tree_util.tree_flatten_with_path(params)[0]
        except Exception as e:  # noqa: BLE001 - any malformed tree gets the same message
            raise GenerationError(f"params is not a parameter tree: {e}") from None
        want_d = {jax.tree_util.keystr(p): x.shape for p, x in want}
        got_d = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in got}
        problems = [f"missing {k}" for k in sorted(set(want_d) - set(got_d))]
        problems += [f"unexpected {k}" for k in sorted(set(got_d) - set(want_d))]
        problems += [
            f"{k}: checkpoint {got_d[k]} vs config {want_d[k]}"
            for k in sorted(set(want_d) & set(got_d))
            if tuple(got_d[k]) != tuple(want_d[k])
        ]
        if problems:
            raise GenerationError(
                "The parameters do not match the model config ("
                + "; ".join(problems[:8])
                + ("; ..." if len(problems) > 8 else "")
                + "). Load the config.json that was saved with these weights."
            )

    def shard_params(self, params):
        """Checks `params` against the config and places them on the mesh by the rules.

        Boxed params (what `LoopCoder(cfg).init(...)["params"]` returns, leaves wrapped in
        `nn.Partitioned`) are unboxed first.
        """
        params = nn.unbox(params)
        self.check_params(params)
        return jax.tree.map(_to_global, params, self.param_shardings)

    # -------------------------------------------------------------- traced programs
    def _apply(self, params, *args, method):
        with nn.logical_axis_rules(self.rules):
            return self.model.apply({"params": params}, *args, method=method)

    def _prefill_impl(self, params, ids, lengths, max_length: int):
        logits, cache = self._apply(
            params, ids, lengths, method=functools.partial(_prefill, max_length=max_length)
        )
        return logits, cache

    def _emit(self, step, tokens, active):
        # Unordered callbacks (ordered ones are not allowed on a multi-device mesh) may in
        # principle arrive out of order: hold early steps back and deliver in step order.
        with self._stream_lock:
            if self._stream_fn is None:
                return
            self._stream_pending[int(step)] = (np.asarray(tokens), np.asarray(active))
            while self._stream_next in self._stream_pending:
                toks, act = self._stream_pending.pop(self._stream_next)
                self._stream_fn(self._stream_next, toks, act)
                self._stream_next += 1

    def _decode_impl(
        self,
        params,
        logits,
        cache: LoopCache,
        row_keys,
        active,
        eos_ids,
        forced,
        num_steps,
        *,
        buffer: int,
        sampling: Sampling,
        stream: bool,
        collect_logits: bool,
    ):
        """The decode loop, all on device.

        Args:
          logits: [B, V] prefill logits (predicting the first new token).
          cache: the prefill cache (donated).
          row_keys: [B, 2] uint32 PRNG key data, one key per row (step s uses
            fold_in(row_key, s)).
          active: [B] bool; False rows (batch padding) are done from the start.
          eos_ids: [E] int32 stop ids.
          forced: None, or [B, N] teacher-forced tokens used instead of sampled ones.
          num_steps: int32 scalar <= N, the new tokens wanted (traced: one program serves
            every max_new_tokens up to `buffer`).
          buffer: N, the static length of the token buffer.
        Returns:
          (tokens [B, N] int32, num_tokens [B] int32 tokens produced per row (incl. the EOS),
           logits [B, N, V] float32 if collect_logits else None).
        """
        b = logits.shape[0]
        row_keys = jax.random.wrap_key_data(row_keys)
        fill = eos_ids[0]  # what finished rows feed back; never reported

        def choose(step, logits, done):
            if forced is not None:
                tok = forced[:, step]
            else:
                keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
                tok = sample_tokens(keys, logits, sampling)
            tok = jnp.where(done, fill, tok)
            if stream:
                jax.debug.callback(self._emit, step, tok, ~done)
            now_done = done | jnp.isin(tok, eos_ids)
            return tok, now_done

        tokens = jnp.zeros((b, buffer), jnp.int32)
        out_logits = None
        if collect_logits:
            out_logits = jnp.zeros((b, buffer, logits.shape[-1]), jnp.float32)
        done = ~active
        num_tokens = jnp.zeros((b,), jnp.int32)
        tok, new_done = choose(0, logits, done)
        tokens = tokens.at[:, 0].set(tok)
        num_tokens = num_tokens + (~done).astype(jnp.int32)
        if collect_logits:
            out_logits = out_logits.at[:, 0].set(logits)

        def cond(state):
            step, _, _, _, done, _, _ = state
            return (step < num_steps) & ~jnp.all(done)

        def body(state):
            step, prev, cache, tokens, done, num_tokens, out_logits = state
            logits, cache = self._apply(params, prev[:, None], cache, method=_decode_step)
            tok, new_done = choose(step, logits, done)
            tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
            num_tokens = num_tokens + (~done).astype(jnp.int32)
            if collect_logits:
                out_logits = jax.lax.dynamic_update_slice(
                    out_logits, logits[:, None].astype(jnp.float32), (0, step, 0)
                )
            return step + 1, tok, cache, tokens, new_done, num_tokens, out_logits

        state = (jnp.int32(1), tok, cache, tokens, new_done, num_tokens, out_logits)
        _, _, _, tokens, _, num_tokens, out_logits = jax.lax.while_loop(cond, body, state)
        return tokens, num_tokens, out_logits

    # -------------------------------------------------------------- host side
    def plan(self, prompt_ids, max_new_tokens: int) -> dict:
        """What a `generate` call would allocate: batch (padded), cache_length, cache_bytes.

        Validates the prompts exactly like `generate` (same errors).
        """
        ids, _, _, s, _ = self._prepare(prompt_ids, max_new_tokens)
        nbytes = cache_bytes(self.cfg, ids.shape[0], s, jnp.dtype(self.runtime.dtype))
        return dict(batch=int(ids.shape[0]), cache_length=s, cache_bytes=nbytes)

    def _prepare(self, prompt_ids, max_new_tokens: int):
        """Validates prompts; returns (ids [B', T], lengths [B'], active [B'], S, N buffer)."""
        cfg = self.cfg
        if isinstance(prompt_ids, np.ndarray | jax.Array):
            arr = np.asarray(prompt_ids)
            if arr.ndim == 1:
                raise GenerationError(
                    "prompt_ids must be a batch: a list of token-id lists or a [B, T] array; "
                    "wrap a single prompt as [ids]."
                )
            prompts = [list(map(int, row)) for row in arr]
        else:
            prompts = []
            for p in prompt_ids:
                if isinstance(p, int | np.integer):
                    raise GenerationError(
                        "prompt_ids must be a list of prompts (lists of ids); wrap a single "
                        "prompt as [ids]."
                    )
                prompts.append([int(t) for t in p])
        if not prompts:
            raise GenerationError("No prompts given.")
        if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}.")
        ctx = cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if not p:
                raise GenerationError(
                    f"Prompt {i} is empty; give at least one token (encode with add_bos=True "
                    "so a prompt always starts with BOS)."
                )
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise GenerationError(
                    f"Prompt {i} has token ids {bad[:5]} outside the model's vocabulary "
                    f"[0, {cfg.vocab_size}); was it encoded with a different tokenizer?"
                )
            if len(p) > ctx:
                raise GenerationError(
                    f"Prompt {i} has {len(p)} tokens but the model's context is {ctx} "
                    "(max_position_embeddings); shorten or truncate the prompt."
                )
            if len(p) + max_new_tokens > ctx:
                raise GenerationError(
                    f"Prompt {i} ({len(p)} tokens) + max_new_tokens={max_new_tokens} exceeds "
                    f"the model's context of {ctx} tokens; use max_new_tokens <= {ctx - len(p)}."
                )
        # Shapes are bucketed so that nearby requests reuse one compiled program: the prompt
        # length T and the new-token buffer N to multiples of `length_bucket`, the batch to a
        # power of two times the data-parallel size. The cache length S is a whole number of
        # decode attention blocks, so a step reads only the blocks in use.
        longest = max(len(p) for p in prompts)
        t = _round_up(longest, self.length_bucket)
        n_buf = _round_up(max_new_tokens, self.length_bucket)
        s = _round_up(t + n_buf, self.decode_block)
        b_real = len(prompts)
        b = self.data_parallel * 2 ** math.ceil(math.log2(-(-b_real // self.data_parallel)))
        ids = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)  # padding rows: one token, inactive
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
            lengths[i] = len(p)
        active = np.arange(b) < b_real
        return ids, lengths, active, s, n_buf

    def _row_keys(self, seed, batch: int, b_real: int):
        if isinstance(seed, int | np.integer):
            base = jax.random.key(int(seed))
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch))
            return np.asarray(jax.random.key_data(keys))
        seeds = [int(s) for s in seed]
        if len(seeds) != b_real:
            raise GenerationError(f"Got {len(seeds)} seeds for {b_real} prompts; give one each.")
        seeds += [0] * (batch - b_real)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        return np.asarray(jax.random.key_data(keys))  # [B, 2] uint32: plain data crosses hosts

    def _eos_array(self, eos_ids):
        """[E] int32 stop ids; () (explicit, or a config without eos_token_id) means none:
        every row then generates exactly `max_new_tokens` (DESIGN.md §7)."""
        eos = tuple(self.cfg.eos_token_id) if eos_ids is None else tuple(eos_ids)
        bad = [e for e in eos if not 0 <= int(e) < self.cfg.vocab_size]
        if bad:
            raise GenerationError(
                f"eos_ids {bad} are outside the vocabulary [0, {self.cfg.vocab_size})."
            )
        # -1 is never sampled: one id keeps the decode loop's shapes, and nothing stops.
        return np.asarray(eos or (-1,), np.int32)

    def generate(
        self,
        params,
        prompt_ids,
        max_new_tokens: int,
        *,
        sampling: Sampling = Sampling(),
        eos_ids: Sequence[int] | None = None,
        seed: int | Sequence[int] = 0,
        stream: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    ) -> Generation:
        """Generates up to `max_new_tokens` per prompt.

        Args:
          params: the parameter tree (anywhere; it is placed on the mesh if it is not).
          prompt_ids: a list of token-id lists (ragged is fine) or a [B, T] int array.
          sampling: `Sampling` (greedy by default).
          eos_ids: stop ids (default: the config's `eos_token_id`s); each row stops on its own.
            An empty sequence means no stop id: exactly `max_new_tokens` per row.
          seed: an int (row b uses fold_in(key(seed), b)) or one int per prompt (row b uses
            key(seed[b]): the same prompt and seed give the same tokens in any batch).
          stream: optional `fn(step, tokens [B], active [B])` called from the device loop with
            each step's tokens (`active` False for rows that had already finished).
        """
        ids, lengths, active, s, n_buf = self._prepare(prompt_ids, max_new_tokens)
        b_real = int(active.sum())
        keys = self._row_keys(seed, ids.shape[0], b_real)
        eos = self._eos_array(eos_ids)
        params = self._placed(params)
        nbytes = cache_bytes(self.cfg, ids.shape[0], s, jnp.dtype(self.runtime.dtype))
        log.info("KV cache: %d bytes (batch %d x %d positions)", nbytes, ids.shape[0], s)

        (tokens, num_tokens, _), times = self._run(
            params, ids, lengths, s, keys, active, eos, None, max_new_tokens, n_buf,
            sampling=sampling, stream=stream,
        )  # fmt: skip
        tokens, num_tokens = jax.device_get((tokens, num_tokens))

        eos_set = {int(e) for e in np.asarray(eos) if e >= 0}
        out, reasons = [], []
        for i in range(b_real):
            row = [int(x) for x in tokens[i, : num_tokens[i]]]
            out.append(row)
            reasons.append("stop" if row and row[-1] in eos_set else "length")
        new = sum(len(r) for r in out)
        stats = dict(
            cache_bytes=nbytes,
            batch=int(ids.shape[0]),
            cache_length=s,
            prompt_tokens=int(lengths[:b_real].sum()),
            new_tokens=new,
            **times,
            prefill_tok_s=float(lengths[:b_real].sum()) / max(times["prefill_s"], 1e-9),
            decode_tok_s=new / max(times["decode_s"], 1e-9),
        )
        return Generation(out, reasons, stats)

    def teacher_forced_logits(self, params, prompt_ids, continuations) -> list[np.ndarray]:
        """Logits the cached engine predicts while fed `continuations` (for testing).

        Runs the same prefill and decode loop as `generate`, with each row's tokens forced.
        Returns per row float32 [N_b, V]: entry i predicts continuation token i (entry 0 comes
        from prefill, the rest from decode steps).
        """
        n = max(len(c) for c in continuations)
        ids, lengths, active, s, n_buf = self._prepare(prompt_ids, n)
        forced = np.zeros((ids.shape[0], n_buf), np.int32)
        for i, c in enumerate(continuations):
            forced[i, : len(c)] = c
        params = self._placed(params)
        keys = self._row_keys(0, ids.shape[0], len(continuations))
        # A single id no continuation contains, so forced rows never stop early.
        eos = np.asarray([-1], np.int32)
        (_, _, out), _ = self._run(
            params, ids, lengths, s, keys, active, eos, forced, n, n_buf,
            sampling=Sampling(), collect_logits=True,
        )  # fmt: skip
        out = np.asarray(jax.device_get(out))
        return [out[i, : len(c)] for i, c in enumerate(continuations)]

    def _run(
        self, params, ids, lengths, s, keys, active, eos, forced, num_steps, n_buf, *,
        sampling, stream=None, collect_logits=False,
    ):  # fmt: skip
        """Prefill then the decode loop, each compiled ahead of time once per shape.

        Returns the decode loop's outputs and the timings compile_s (0 when both programs were
        already compiled), prefill_s and decode_s (execution only).
        """
        times = dict(compile_s=0.0)
        ids, lengths = _to_global(ids, self._rows2), _to_global(lengths, self._row)
        keys, active = _to_global(keys, self._rows2), _to_global(active, self._row)
        eos = _to_global(eos, self._replicated)
        num_steps = _to_global(np.int32(num_steps), self._replicated)
        if forced is not None:
            forced = _to_global(forced, self._rows2)
        static = dict(
            buffer=n_buf, sampling=sampling, stream=stream is not None,
            collect_logits=collect_logits,
        )  # fmt: skip
        with self._mesh_context():
            key = ("prefill", ids.shape, s)
            if key not in self._compiled:
                t = time.perf_counter()
                self._compiled[key] = self._prefill.lower(params, ids, lengths, s).compile()
                times["compile_s"] += time.perf_counter() - t
            t = time.perf_counter()
            logits, cache = self._compiled[key](params, ids, lengths)
            jax.block_until_ready(logits)
            times["prefill_s"] = time.perf_counter() - t

            args = (params, logits, cache, keys, active, eos, forced, num_steps)
            key = ("decode", ids.shape, s, eos.shape, tuple(sorted(static.items())))
            if key not in self._compiled:
                t = time.perf_counter()
                self._compiled[key] = self._decode.lower(*args, **static).compile()
                times["compile_s"] += time.perf_counter() - t
            with self._stream_lock:
                self._stream_fn, self._stream_next, self._stream_pending = stream, 0, {}
            try:
                t = time.perf_counter()
                out = self._compiled[key](*args)
                jax.block_until_ready(out)
                times["decode_s"] = time.perf_counter() - t
            finally:
                jax.effects_barrier()  # every streamed step has been delivered
                with self._stream_lock:
                    self._stream_fn = None
        return out, times

    def _mesh_context(self):
        # Tracing under the mesh turns the model's logical activation constraints into real
        # sharding constraints (batch over the data axes, heads over `tensor`).
        return jax.set_mesh(self.mesh)

    def _placed(self, params):
        params = nn.unbox(params)
        leaves = jax.tree.leaves(params)
        shardings = jax.tree.leaves(self.param_shardings)
        if len(leaves) == len(shardings) and all(
            isinstance(x, jax.Array) and x.sharding == s
            for x, s in zip(leaves, shardings, strict=True)
        ):
            return params
        return self.shard_params(params)


def _to_global(x, sharding):
    """Places host data (the same value on every process) as one global array on `sharding`.

    Works with one process and with several (`jax.distributed`), where each process
    contributes the slices its own devices hold.
    """
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _prefill(module, ids, lengths, *, max_length):
    return module.prefill(ids, lengths, max_length=max_length)


def _decode_step(module, ids, cache):
    return module.decode_step(ids, cache)


@functools.lru_cache(maxsize=8)
def _cached_engine(cfg, runtime, mesh, rules) -> Engine:
    return Engine(cfg, runtime, mesh, rules)


def get_engine(
    cfg: ModelConfig,
    runtime: RuntimeConfig = _DEFAULT_RUNTIME,
    mesh: Mesh | None = None,
    rules: sh.Rules = sh.FSDP_TP,
) -> Engine:
    """The shared `Engine` for these settings (built once; its compiled programs are reused)."""
    return _cached_engine(cfg, runtime, mesh, tuple(rules))


def generate(
    cfg: ModelConfig,
    params,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: Sequence[int] | None = None,
    seed: int | Sequence[int] = 0,
    runtime: RuntimeConfig = _DEFAULT_RUNTIME,
    mesh: Mesh | None = None,
    rules: sh.Rules = sh.FSDP_TP,
    stream: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> list[list[int]]:
    """New token ids per prompt (each row stops after its first EOS id, which is included).

    Args:
      cfg: the model config; params: its parameter tree (boxed, as `init` returns it, is fine).
      prompt_ids: list of token-id lists (ragged allowed) or a [B, T] int array.
      max_new_tokens: at most this many new tokens per prompt.
      temperature, top_k, top_p: sampling (temperature 0 = greedy; see `Sampling`;
        `INSTRUCT_SAMPLING` holds the model card's instruct defaults).
      eos_ids: stop ids (default cfg.eos_token_id); () = none, exactly max_new_tokens each.
      seed: int, or one int per prompt (see `Engine.generate`).
      runtime, mesh, rules: how to run (default: float32 on one device).
      stream: optional per-step callback (see `Engine.generate`).
    The engine for (cfg, runtime, mesh, rules) is compiled once and reused across calls.
    """
    engine = get_engine(cfg, runtime, mesh, rules)
    sampling = Sampling(temperature, top_k, top_p)
    result = engine.generate(
        params, prompt_ids, max_new_tokens, sampling=sampling, eos_ids=eos_ids, seed=seed,
        stream=stream,
    )  # fmt: skip
    return result.tokens
