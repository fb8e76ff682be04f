"""Decode slots for continuous batching: the device programs (JetStream's prefill/insert/generate).

A fixed number of slots B share one decode cache of S positions per slot. Prefill:
  * a prompt of at most C tokens is prefilled in one chunk, batched with other such prompts
    (`prefill_insert`: R prompts of one length bucket -> one `LoopCoder.prefill_chunk` call on
    a fresh R-row cache of T positions, whose rows are then written straight into their slots,
    where each request's first token is sampled: prefill and insert are one program);
  * a longer prompt runs alone through a batch-1 cache, C tokens at a time
    (`new_prefill` / `prefill_chunk`), and is then *inserted* into its slot (`insert`).
Chunk lengths T are bucketed (`SlotEngine.buckets`: powers of two up to a step, then multiples
of the step up to C) and batch rows R to powers of two, so the programs are few and fixed.
`decode` runs a few steps for every slot at once with per-slot positions, sampling
parameters, PRNG keys and token budgets; a slot that generates a stop id or runs out of budget
goes inactive within the call and its cache row is left to be overwritten by the next insert.
Every program has fixed shapes and is compiled once: requests never recompile. The `*_async`
methods return device arrays without waiting, so a scheduler step dispatches its prefills
and its decode call and then reads everything back with one transfer.

Who decides what runs when (queues, callbacks, cancellation) is `serving/scheduler.py`.

Shape legend as in model/loopcoder.py; B here is the number of slots, P decode steps per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

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
MIN_BUCKET_STEP = 64  # chunk buckets are multiples of the step (>= this) above it
MAX_STEP_BUCKETS = 8  # at most this many multiples of the step (the step grows with C)


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


class SlotRequest(NamedTuple):
    """One prompt for `SlotEngine.prefill_insert_async` and the settings of its slot."""

    prompt: Sequence[int]
    slot: int
    seed: int = 0
    sampling: Sampling = Sampling()
    max_new_tokens: int = 1
    ignore_eos: bool = False


def chunk_buckets(chunk: int) -> list[int]:
    """Prefill chunk lengths for a longest chunk C: powers of two from MIN_CHUNK up to a step,
    then the multiples of the step up to C (step = max(MIN_BUCKET_STEP, C / MAX_STEP_BUCKETS)
    rounded up to a multiple of MIN_CHUNK), and C itself. C = 512: 16, 32, 64, 128, ..., 512
    (10 lengths; a prompt is padded by less than 64 tokens, not up to 2x)."""
    step = max(MIN_BUCKET_STEP, -(-chunk // MAX_STEP_BUCKETS))
    step = -(-step // MIN_CHUNK) * MIN_CHUNK
    out = {min(MIN_CHUNK * 2**i, chunk) for i in range(32) if MIN_CHUNK * 2**i < step}
    out |= {min(step * i, chunk) for i in range(1, -(-chunk // step) + 1)}
    return sorted(b for b in out if b <= chunk)


def _put_row(big, small, axis: int, slot):
    """big with `small` (size 1 on `axis`) written at index `slot` of `axis`, from 0 elsewhere."""
    starts = [0] * big.ndim
    starts[axis] = slot
    return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), starts)


def _write_rows(cache: LoopCache, rows: LoopCache, slots) -> LoopCache:
    """The slots' cache with rows.[r] written into slot slots[r] (r = 0..R-1, in order): the
    loop-0 K/V at positions 0..T-1 (T <= S) and the whole ring buffers. Lengths unchanged."""
    gk, gv, lk, lv = cache.global_k, cache.global_v, cache.local_k, cache.local_v
    for r in range(rows.global_k.shape[1]):
        gk = _put_row(gk, rows.global_k[:, r : r + 1], 1, slots[r])
        gv = _put_row(gv, rows.global_v[:, r : r + 1], 1, slots[r])
        lk = _put_row(lk, rows.local_k[:, :, r : r + 1], 2, slots[r])
        lv = _put_row(lv, rows.local_v[:, :, r : r + 1], 2, slots[r])
    return cache.replace(global_k=gk, global_v=gv, local_k=lk, local_v=lv)


def _activate(state: SlotState, slots, logits, rows, lengths, eos_ids):
    """Samples the first token of R requests just written into `slots` and starts them.

    logits: [R, V] at each prompt's last token; rows: per-row (key data [R, 2], temperature,
    top_k, top_p, max_new_tokens, use_eos); lengths: [R] prompt lengths. Token 0 of a request
    is sampled with fold_in(key, 0), as in decode. Returns (state, [R, 2] int32: first token,
    done). A request done at once leaves its slot free (cache length 0).
    """
    keys, temperature, top_k, top_p, budget, use_eos = rows
    first = jax.vmap(lambda k: jax.random.fold_in(k, 0))(jax.random.wrap_key_data(keys))
    tok = sample_rows(first, logits, temperature, top_k, top_p)
    done = (jnp.isin(tok, eos_ids) & use_eos) | (budget <= 1)
    state = SlotState(
        cache=state.cache.replace(
            lengths=state.cache.lengths.at[slots].set(jnp.where(done, 0, lengths))
        ),
        tokens=state.tokens.at[slots].set(tok),
        keys=state.keys.at[slots].set(keys),
        steps=state.steps.at[slots].set(1),
        remaining=state.remaining.at[slots].set(budget - 1),
        active=state.active.at[slots].set(~done),
        temperature=state.temperature.at[slots].set(temperature),
        top_k=state.top_k.at[slots].set(top_k),
        top_p=state.top_p.at[slots].set(top_p),
        use_eos=state.use_eos.at[slots].set(use_eos),
    )
    return state, jnp.stack([tok, done.astype(jnp.int32)], axis=1)


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """slots: decode rows B; max_length: positions per slot (prompt + new tokens, rounded up to
    the decode block); chunk: the longest prefill chunk C; steps_per_call: decode steps P per
    device call (a finished slot is refilled after at most P steps); prefill_rows: the most
    prompts one batched prefill call runs (capped at `slots`)."""

    slots: int = 8
    max_length: int = 2048
    chunk: int = 512
    steps_per_call: int = 4
    prefill_rows: int = 8

    def __post_init__(self):
        for name in ("slots", "max_length", "chunk", "steps_per_call", "prefill_rows"):
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
        self.buckets = chunk_buckets(self.chunk)
        # Batched prefill: R prompts per call, R a power of two (a short group is padded with
        # copies of its last row, which write the same slot with the same values).
        most = min(config.prefill_rows, config.slots)
        self.row_buckets = [2**i for i in range(most.bit_length()) if 2**i <= most]
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
            self._prefill_insert = jax.jit(
                self._prefill_insert_impl,
                in_shardings=(engine.param_shardings, self.state_shardings) + (rep,) * 5,
                out_shardings=(self.state_shardings, rep),
                donate_argnums=(1,),
            )
            self._decode = jax.jit(
                self._decode_impl,
                in_shardings=(engine.param_shardings, self.state_shardings, rep),
                out_shardings=(self.state_shardings, rep),
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

    def _insert_impl(self, state: SlotState, cache: LoopCache, logits, slots, rows, eos_ids):
        """Writes R prefilled cache rows into their slots and samples each first token.

        cache: R rows of T <= S positions (a batch-1 cache of the long-prompt path, or the
        fresh rows of `_prefill_rows_impl`); logits: [R, V] at each prompt's last token; slots: [R];
        rows: per-row (key data [R, 2] uint32, temperature, top_k, top_p, max_new_tokens,
        use_eos). Returns (state, [R, 2] int32: first token, done).
        """
        state = state.replace(cache=_write_rows(state.cache, cache, slots))
        return _activate(state, slots, logits, rows, cache.lengths, eos_ids)

    def _prefill_rows_impl(self, params, ids, lengths):
        """R whole prompts (ids [R, T], T <= C) in one chunk on a fresh R-row cache of T
        positions: (logits [R, V] at each last token, the cache)."""
        r, t = ids.shape
        cache = init_cache(self.cfg, r, t, self.dtype)
        with nn.logical_axis_rules(self._rules1):
            return self.model.apply(
                {"params": params}, ids, cache, lengths, method=LoopCoder.prefill_chunk
            )

    def _prefill_insert_impl(self, params, state: SlotState, ids, lengths, slots, rows, eos_ids):
        """Prefills R whole prompts in one chunk and inserts each into its slot.

        ids: [R, T] right-padded prompts (T <= C, a bucket); lengths: [R] their lengths;
        slots: [R] the slot of each row; rows: per-row (key data [R, 2], temperature, top_k,
        top_p, max_new_tokens, use_eos), as in `_insert_impl`. A fresh R-row cache of T
        positions holds the chunk (nothing before it); row r's K/V then go to positions 0..T-1
        of slot slots[r] (what lies past its length is overwritten before it is read) and its
        ring buffers replace the slot's. Returns (state, [R, 2] int32: first token, done).
        """
        logits, cache = self._prefill_rows_impl(params, ids, lengths)
        return self._insert_impl(state, cache, logits, slots, rows, eos_ids)

    def _decode_impl(self, params, state: SlotState, eos_ids):
        """Up to P decode steps for every slot, on device.

        Returns (state, tokens [B, P] int32, -1 where the slot emitted nothing). A slot emits
        while active; it goes inactive after a stop id or when its budget is spent, and its
        cache length is then reset to 0, so a free slot costs one cheap write per step and no
        cache reads.
        """
        p = self.steps_per_call
        b = self.slots
        out = jnp.full((b, p), -1, jnp.int32)

        def cond(carry):
            j, state, _ = carry
            return (j < p) & jnp.any(state.active)

        def body(carry):
            j, state, out = carry
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
            out = jax.lax.dynamic_update_slice(out, jnp.where(act, tok, -1)[:, None], (0, j))
            return j + 1, state, out

        _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
        return state, out

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

    def _row(self, seed, sampling: Sampling, max_new_tokens: int, ignore_eos: bool):
        """Host values of a request's per-slot settings (see `_insert_impl`)."""
        key = np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)
        top_k = self.cfg.vocab_size if sampling.top_k is None else sampling.top_k
        top_p = 1.0 if sampling.top_p is None else sampling.top_p
        return (
            key,
            np.float32(sampling.temperature),
            np.int32(min(top_k, self.cfg.vocab_size)),
            np.float32(top_p),
            np.int32(max_new_tokens),
            np.bool_(not ignore_eos),
        )

    def insert_async(
        self, cache1, logits, slot: int, *, seed: int, sampling: Sampling, max_new_tokens: int,
        eos_ids, ignore_eos: bool = False,
    ) -> jax.Array:  # fmt: skip
        """Puts a request prefilled by `prefill_chunk` into `slot`; returns, without waiting,
        a device [1, 2] int32 array (first token, finished already)."""
        row = self._row(seed, sampling, max_new_tokens, ignore_eos)
        return self._insert_rows(cache1, logits, [slot], [row], eos_ids)

    def _slot_args(self, slots, rows, eos_ids) -> tuple:
        """Device (slots [R], per-row settings stacked column-wise, eos ids) of an insert."""
        put = lambda x: _to_global(x, self._rep)  # noqa: E731
        columns = tuple(put(np.stack(col)) for col in zip(*rows, strict=True))
        return put(np.asarray(slots, np.int32)), columns, self._device_eos(eos_ids)

    def _insert_rows(self, cache, logits, slots, rows, eos_ids) -> jax.Array:
        with self.engine._mesh_context():
            self.state, out = self._insert(
                self.state, cache, logits, *self._slot_args(slots, rows, eos_ids)
            )
        return out

    def insert(self, cache1, logits, slot: int, **kw) -> tuple[int, bool]:
        """`insert_async`, read back: (first token, finished already)."""
        tok, done = jax.device_get(self.insert_async(cache1, logits, slot, **kw))[0]
        return int(tok), bool(done)

    def prefill_rows(self, n: int) -> int:
        """The batch rows a call of n prompts runs (the smallest row bucket >= n)."""
        return next(r for r in self.row_buckets if r >= n)

    def _rows_of(self, requests: Sequence[SlotRequest]):
        """Host arrays of a batched prefill: (ids [R, T], lengths, slots, per-row settings)."""
        n = len(requests)
        if not 1 <= n <= self.row_buckets[-1]:
            raise GenerationError(f"A batched prefill takes 1 to {self.row_buckets[-1]} prompts.")
        longest = max(len(q.prompt) for q in requests)
        if longest > self.chunk:
            raise GenerationError(f"A {longest}-token prompt exceeds the chunk of {self.chunk}.")
        r, t = self.prefill_rows(n), self.bucket(longest)
        padded = list(requests) + [requests[-1]] * (r - n)  # copies write the same slot
        ids = np.zeros((r, t), np.int32)
        for i, q in enumerate(padded):
            ids[i, : len(q.prompt)] = q.prompt
        lengths = np.asarray([len(q.prompt) for q in padded], np.int32)
        slots = [q.slot for q in padded]
        rows = [self._row(q.seed, q.sampling, q.max_new_tokens, q.ignore_eos) for q in padded]
        return ids, lengths, slots, rows

    def prefill_insert_async(self, requests: Sequence[SlotRequest], eos_ids) -> jax.Array:
        """Prefills prompts of at most C tokens in one call and inserts each into its slot.

        requests: 1 to `row_buckets[-1]` `SlotRequest`s with distinct free slots. The call
        runs R = `prefill_rows(len(requests))` rows of T = `bucket(longest prompt)` tokens.
        Returns, without waiting, a device [R, 2] int32 array: row i is (first token,
        finished already) of requests[i] (rows past len(requests) are padding).
        """
        ids, lengths, slots, rows = self._rows_of(requests)
        with self.engine._mesh_context():
            self.state, out = self._prefill_insert(
                self.params, self.state, _to_global(ids, self._rep),
                _to_global(lengths, self._rep), *self._slot_args(slots, rows, eos_ids),
            )  # fmt: skip
        return out

    def _device_eos(self, eos_ids):
        key = tuple(int(e) for e in np.asarray(eos_ids))
        if getattr(self, "_eos_key", None) != key:  # placed once, not on every call
            self._eos_key, self._eos_dev = key, _to_global(np.asarray(key, np.int32), self._rep)
        return self._eos_dev

    def decode_async(self, eos_ids) -> jax.Array:
        """P steps for all slots; returns, without waiting, a device [B, P] int32 array of the
        tokens each slot emitted (-1: none)."""
        with self.engine._mesh_context():
            self.state, out = self._decode(self.params, self.state, self._device_eos(eos_ids))
        return out

    def decode(self, eos_ids) -> tuple[np.ndarray, np.ndarray]:
        """P steps for all slots; returns host (tokens [B, P], emitted [B, P])."""
        out = np.asarray(jax.device_get(self.decode_async(eos_ids)))
        return out, out >= 0

    def release(self, slot: int) -> None:
        """Frees a slot whose request was cancelled (its row stops generating)."""
        with self.engine._mesh_context():
            self.state = self._release(self.state, _to_global(np.int32(slot), self._rep))

    def capacity(self) -> int:
        """Most prompt + new tokens one request may hold."""
        return self.max_length


def eos_array(engine: Engine, eos_ids) -> np.ndarray:
    return engine._eos_array(eos_ids)


__all__ = [
    "SlotConfig",
    "SlotEngine",
    "SlotRequest",
    "SlotState",
    "chunk_buckets",
    "eos_array",
    "sample_rows",
]
