"""Decode slots for continuous batching: the device programs (JetStream's prefill/insert/generate).

A fixed number of slots B share one decode cache of S positions per slot. A request is
prefilled alone into a batch-1 cache, C tokens at a time (`LoopCoder.prefill_chunk`, chunk
lengths bucketed to powers of two up to C), then *inserted* into a free slot, where its first
token is sampled. `decode` runs a few steps for every slot at once with per-slot positions,
sampling parameters, PRNG keys and token budgets; a slot that generates a stop id or runs out
of budget goes inactive within the call and its cache row is left to be overwritten by the
next insert. Every program has fixed shapes and is compiled once: requests never recompile.

Who decides what runs when (queues, callbacks, cancellation) is `serving/scheduler.py`.

Shape legend as in model/loopcoder.py; B here is the number of slots, P decode steps per call.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from loopcoder_jax import sharding as sh
from loopcoder_jax.cache import CACHE_AXES, LoopCache, init_cache
from loopcoder_jax.generate import Engine, GenerationError, Sampling, _to_global
from loopcoder_jax.model import LoopCoder

MIN_CHUNK = 16  # smallest chunk bucket


@flax.struct.dataclass
class SlotState:
    """Everything the decode loop carries per slot (all [B] unless noted)."""

    cache: LoopCache
    tokens: jax.Array  # int32: the last token of each slot (the next decode input)
    keys: jax.Array  # [B, 2] uint32 PRNG key data; step s samples with fold_in(key, s)
    steps: jax.Array  # int32: tokens sampled so far (the next fold_in index)
    remaining: jax.Array  # int32: tokens the slot may still generate
    active: jax.Array  # bool
    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; V = no top-k
    top_p: jax.Array  # float32; 1 = no top-p
    use_eos: jax.Array  # bool: a stop id ends the slot (False: only the budget does)


def sample_rows(keys, logits, temperature, top_k, top_p):
    """One token per row, each row with its own sampling parameters (HF order: T, top-k, top-p).

    keys: [B] PRNG keys; logits: [B, V]; temperature [B] (0 = greedy), top_k [B] int (V = all),
    top_p [B] (1 = all) -> [B] int32. Rows sample independently of their neighbours.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]

    def sampled():
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        srt, idx = jax.lax.top_k(scaled, v)  # descending
        srt = jnp.where(jnp.arange(v)[None, :] < top_k[:, None], srt, -jnp.inf)
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        srt = jnp.where(before < top_p[:, None], srt, -jnp.inf)  # the top token is always kept
        choice = jax.vmap(jax.random.categorical)(keys, srt)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    # The sort costs O(V log V) per row: skip it when every row is greedy.
    tok = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
    return jnp.where(temperature > 0, tok, greedy)


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """slots: decode rows B; max_length: positions per slot (prompt + new tokens, rounded up to
    the decode block); chunk: the longest prefill chunk C; steps_per_call: decode steps P per
    device call (a finished slot is refilled after at most P steps)."""

    slots: int = 8
    max_length: int = 2048
    chunk: int = 512
    steps_per_call: int = 4

    def __post_init__(self):
        for name in ("slots", "max_length", "chunk", "steps_per_call"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GenerationError(f"{name} must be a positive integer, got {value!r}.")


class SlotEngine:
    """The fixed-shape device programs of continuous batching over one `generate.Engine`
    (its model, mesh, rules and shardings: slots are split over the data axes like a batch)."""

    def __init__(self, engine: Engine, params, config: SlotConfig = SlotConfig()):
        cfg = engine.cfg
        self.engine, self.cfg, self.config = engine, cfg, config
        self.params = engine._placed(params)
        self.model = LoopCoder(cfg, engine.runtime)
        if config.slots % engine.data_parallel:
            raise GenerationError(
                f"slots={config.slots} must be a multiple of the mesh's data-parallel size "
                f"{engine.data_parallel} (slots are split over the data axes like a batch)."
            )
        self.slots = config.slots
        self.max_length = min(config.max_length, cfg.max_position_embeddings)
        # Cache positions: a whole number of decode blocks (see `Engine._prepare`).
        self.cache_length = -(-self.max_length // engine.decode_block) * engine.decode_block
        self.chunk = max(MIN_CHUNK, config.chunk)
        self.buckets = [min(MIN_CHUNK * 2**i, self.chunk) for i in range(32)]
        self.buckets = sorted({b for b in self.buckets if b <= self.chunk})
        self.steps_per_call = config.steps_per_call
        self.dtype = jnp.dtype(engine.runtime.dtype)

        mesh, rules = engine.mesh, engine.rules
        specs = jax.tree.map(
            lambda axes: PartitionSpec(*axes), CACHE_AXES, is_leaf=lambda x: isinstance(x, tuple)
        )
        # The batch-1 prefill cache is not split over the data axes (one row cannot be).
        self._rules1 = tuple((n, None if n == sh.BATCH else t) for n, t in rules)
        cache1 = sh.logical_to_mesh_sharding(specs, mesh, self._rules1)
        row, rows2, rep = engine._row, engine._rows2, engine._replicated
        self.state_shardings = SlotState(
            cache=engine.cache_shardings,
            tokens=row,
            keys=rows2,
            steps=row,
            remaining=row,
            active=row,
            temperature=row,
            top_k=row,
            top_p=row,
            use_eos=row,
        )
        self._rep = rep
        with engine._mesh_context():
            self._init_state = jax.jit(self._init_state_impl, out_shardings=self.state_shardings)
            self._init_cache1 = jax.jit(
                lambda: init_cache(cfg, 1, self.cache_length, self.dtype), out_shardings=cache1
            )
            self._chunk = jax.jit(
                self._chunk_impl,
                in_shardings=(engine.param_shardings, cache1, rep, rep),
                out_shardings=(rep, cache1),
                donate_argnums=(1,),
            )
            self._insert = jax.jit(
                self._insert_impl,
                out_shardings=(self.state_shardings, rep),
                donate_argnums=(0,),
            )
            self._decode = jax.jit(
                self._decode_impl,
                in_shardings=(engine.param_shardings, self.state_shardings, rep),
                out_shardings=(self.state_shardings, rep, rep),
                donate_argnums=(1,),
            )
            self._release = jax.jit(
                self._release_impl, out_shardings=self.state_shardings, donate_argnums=(0,)
            )
            self.state = self._init_state()

    # -------------------------------------------------------------- traced programs
    def _init_state_impl(self) -> SlotState:
        b = self.slots
        return SlotState(
            cache=init_cache(self.cfg, b, self.cache_length, self.dtype),
            tokens=jnp.zeros((b,), jnp.int32),
            keys=jnp.zeros((b, 2), jnp.uint32),
            steps=jnp.zeros((b,), jnp.int32),
            remaining=jnp.zeros((b,), jnp.int32),
            active=jnp.zeros((b,), bool),
            temperature=jnp.zeros((b,), jnp.float32),
            top_k=jnp.zeros((b,), jnp.int32),
            top_p=jnp.ones((b,), jnp.float32),
            use_eos=jnp.ones((b,), bool),
        )

    def _chunk_impl(self, params, cache1, ids, n):
        with nn.logical_axis_rules(self._rules1):
            return self.model.apply(
                {"params": params}, ids, cache1, n, method=LoopCoder.prefill_chunk
            )

    def _insert_impl(self, state: SlotState, cache1: LoopCache, logits, slot, row, eos_ids):
        """Writes the prefilled row into `slot` and samples its first token.

        row: (key data [2] uint32, temperature, top_k, top_p, max_new_tokens, use_eos) of the
          request.
        Returns (state, [first token, done]).
        """
        key, temperature, top_k, top_p, budget, use_eos = row

        def put(big, small, axis):
            starts = [0] * big.ndim
            starts[axis] = slot
            return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), starts)

        c = state.cache
        cache = LoopCache(
            global_k=put(c.global_k, cache1.global_k, 1),
            global_v=put(c.global_v, cache1.global_v, 1),
            local_k=put(c.local_k, cache1.local_k, 2),
            local_v=put(c.local_v, cache1.local_v, 2),
            lengths=put(c.lengths, cache1.lengths, 0),
        )
        wrapped = jax.random.wrap_key_data(key)
        tok = sample_rows(
            jax.random.fold_in(wrapped, 0)[None],
            logits,
            temperature[None],
            top_k[None],
            top_p[None],
        )[0]
        done = (jnp.isin(tok, eos_ids) & use_eos) | (budget <= 1)

        def set_(x, value):
            return x.at[slot].set(value)

        state = SlotState(
            cache=cache,
            tokens=set_(state.tokens, tok),
            keys=state.keys.at[slot].set(key),
            steps=set_(state.steps, 1),
            remaining=set_(state.remaining, budget - 1),
            active=set_(state.active, ~done),
            temperature=set_(state.temperature, temperature),
            top_k=set_(state.top_k, top_k),
            top_p=set_(state.top_p, top_p),
            use_eos=set_(state.use_eos, use_eos),
        )
        # A row finished at once is free: its length goes back to 0 (no cache reads).
        lengths = state.cache.lengths.at[slot].set(jnp.where(done, 0, cache1.lengths[0]))
        state = state.replace(cache=state.cache.replace(lengths=lengths))
        return state, jnp.stack([tok, done.astype(jnp.int32)])

    def _decode_impl(self, params, state: SlotState, eos_ids):
        """Up to P decode steps for every slot, on device.

        Returns (state, tokens [B, P] int32, emitted [B, P] bool). A slot emits while active;
        it goes inactive after a stop id or when its budget is spent, and its cache length is
        then reset to 0, so a free slot costs one cheap write per step and no cache reads.
        """
        p = self.steps_per_call
        b = self.slots
        out = jnp.zeros((b, p), jnp.int32)
        emitted = jnp.zeros((b, p), bool)

        def cond(carry):
            j, state, _, _ = carry
            return (j < p) & jnp.any(state.active)

        def body(carry):
            j, state, out, emitted = carry
            with nn.logical_axis_rules(self.engine.rules):
                logits, cache = self.model.apply(
                    {"params": params},
                    state.tokens[:, None],
                    state.cache,
                    method=LoopCoder.decode_step,
                )
            keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state.keys), state.steps)
            tok = sample_rows(keys, logits, state.temperature, state.top_k, state.top_p)
            act = state.active
            tok = jnp.where(act, tok, 0)
            done = (jnp.isin(tok, eos_ids) & state.use_eos) | (state.remaining <= 1)
            still = act & ~done
            cache = cache.replace(lengths=jnp.where(still, cache.lengths, 0))
            state = state.replace(
                cache=cache,
                tokens=tok,
                steps=state.steps + act.astype(jnp.int32),
                remaining=state.remaining - act.astype(jnp.int32),
                active=still,
            )
            out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, j))
            emitted = jax.lax.dynamic_update_slice(emitted, act[:, None], (0, j))
            return j + 1, state, out, emitted

        _, state, out, emitted = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out, emitted))
        return state, out, emitted

    def _release_impl(self, state: SlotState, slot):
        return state.replace(
            active=state.active.at[slot].set(False),
            cache=state.cache.replace(lengths=state.cache.lengths.at[slot].set(0)),
        )

    # -------------------------------------------------------------- host side
    def bucket(self, n: int) -> int:
        """The chunk length that holds the next n prompt tokens (capped at C)."""
        for b in self.buckets:
            if b >= n:
                return b
        return self.buckets[-1]

    def new_prefill(self):
        """An empty batch-1 cache to prefill a request into."""
        with self.engine._mesh_context():
            return self._init_cache1()

    def prefill_chunk(self, cache1, ids: list[int]):
        """Runs the next chunk (len(ids) <= C) of a prompt; returns (logits [1, V], cache1)."""
        c = self.bucket(len(ids))
        arr = np.zeros((1, c), np.int32)
        arr[0, : len(ids)] = ids
        n = np.asarray([len(ids)], np.int32)
        with self.engine._mesh_context():
            return self._chunk(
                self.params, cache1, _to_global(arr, self._rep), _to_global(n, self._rep)
            )

    def insert(
        self,
        cache1,
        logits,
        slot: int,
        *,
        seed: int,
        sampling: Sampling,
        max_new_tokens: int,
        eos_ids,
        ignore_eos: bool = False,
    ) -> tuple[int, bool]:
        """Puts a prefilled request into `slot`; returns (first token, finished already)."""
        key = np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)
        top_k = self.cfg.vocab_size if sampling.top_k is None else sampling.top_k
        top_p = 1.0 if sampling.top_p is None else sampling.top_p
        row = (
            key,
            np.float32(sampling.temperature),
            np.int32(min(top_k, self.cfg.vocab_size)),
            np.float32(top_p),
            np.int32(max_new_tokens),
            np.bool_(not ignore_eos),
        )
        row = tuple(_to_global(x, self._rep) for x in row)
        with self.engine._mesh_context():
            self.state, out = self._insert(
                self.state,
                cache1,
                logits,
                _to_global(np.int32(slot), self._rep),
                row,
                self._device_eos(eos_ids),
            )
        tok, done = (int(x) for x in jax.device_get(out))
        return tok, bool(done)

    def _device_eos(self, eos_ids):
        key = tuple(int(e) for e in np.asarray(eos_ids))
        if getattr(self, "_eos_key", None) != key:  # placed once, not on every call
            self._eos_key, self._eos_dev = key, _to_global(np.asarray(key, np.int32), self._rep)
        return self._eos_dev

    def decode(self, eos_ids) -> tuple[np.ndarray, np.ndarray]:
        """P steps for all slots; returns host (tokens [B, P], emitted [B, P])."""
        with self.engine._mesh_context():
            self.state, out, emitted = self._decode(
                self.params, self.state, self._device_eos(eos_ids)
            )
        return jax.device_get((out, emitted))

    def release(self, slot: int) -> None:
        """Frees a slot whose request was cancelled (its row stops generating)."""
        with self.engine._mesh_context():
            self.state = self._release(self.state, _to_global(np.int32(slot), self._rep))

    def capacity(self) -> int:
        """Most prompt + new tokens one request may hold."""
        return self.max_length


def eos_array(engine: Engine, eos_ids) -> np.ndarray:
    return engine._eos_array(eos_ids)


__all__ = ["SlotConfig", "SlotEngine", "SlotState", "eos_array", "sample_rows"]
