"""Splash's own work as the compiler sees it: a cost-only Pallas kernel for counting compiles.

The planner's FLOP/time compiles cannot cost splash (a Pallas custom call carries no cost
unless the kernel attaches one, and jax's splash attaches none). The dense stand-in
(`kernels/cost_standin.py`) charges XLA dot-product attention in its place: every key of the
causal square and [T, S] score traffic that splash never has. That is an upper bound, and not
the same bound at 8K on one chip as with the sequence sharded, where the context-parallel
kernels charge only the causal blocks.

This module charges what splash itself does, with the same masks and tile sizes the real
program builds (`splash._make_kernel_for`): the kernel object is replaced by `SplashCost`, which
runs Pallas calls that do no attention (they copy a tile) but carry a `pl.CostEstimate` of
splash's block-sparse work. The TPU compiler folds those estimates into `cost_analysis()`
(FLOPs, bytes, `optimal_seconds`) like any other op. Per head and active block of
`block_q` x `block_kv` (`active_blocks`: the blocks the mask does not rule out, on the
busiest query shard):

  forward   QK^T and PV: 4 * bq * bk * D FLOPs, bq * bk exponentials; reads Q once, K and V
            once per active block, writes O and the log-sum-exp
  dq kernel QK^T, dP = dO V^T, dQ = dS K: 6 * bq * bk * D FLOPs
  dkv kernel QK^T, dP, dV = P^T dO, dK = dS^T Q: 8 * bq * bk * D FLOPs; reads Q, dO, lse and
            di once per active block

(splash's unfused backward: `BlockSizes` with dq and dkv tiles, as `splash._make_kernel_for`
sets them). Under remat the forward runs again in the backward pass, as splash's does: 22
block FLOPs of D per score element with `full` remat. K/V traffic is counted per query head
(the kernel walks query heads and fetches each head's kv block), dK/dV writes per query head.
Segment ids change no block count (splash cannot skip a block on data).

The estimate is a roofline: the compiler charges the FLOPs at peak and the bytes at full
bandwidth, as it does every matmul of the step, so the planner's MFU stays an upper bound
("MFU bound"). Numbers the kernels compute are never used: counting compiles are compiled and
costed, not run.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

# Rows of K/V each cost-only call actually fetches (the estimate carries the real traffic).
_STUB_ROWS = 128


# ---------------------------------------------------------------------------- block counts
def _visible_ranges(mask) -> tuple[np.ndarray, np.ndarray]:
    """Per query row, the [first, last] visible key of a splash causal or local mask (both
    see one contiguous key range per row)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if not isinstance(mask, (sm.CausalMask, sm.LocalMask)):
        raise TypeError(f"no block count for splash mask {type(mask).__name__}")
    rows, cols = mask.shape
    q = np.asarray(mask.q_sequence, np.int64)
    if isinstance(mask, sm.CausalMask):  # key j visible iff j <= q + offset
        return np.zeros(rows, np.int64), q + mask.offset
    left, right = mask.window_size  # LocalMask: q + offset - left <= j <= q + offset + right
    first = np.zeros(rows, np.int64) if left is None else q + mask.offset - left
    last = np.full(rows, cols - 1, np.int64) if right is None else q + mask.offset + right
    return np.maximum(first, 0), np.minimum(last, cols - 1)


def active_blocks(mask, block_q: int, block_kv: int, q_seq_shards: int = 1) -> int:
    """Blocks of `block_q` x `block_kv` in which `mask` shows at least one key, on the query
    shard with the most of them (the rows split into `q_seq_shards` equal parts, as
    `make_splash_mha(q_seq_shards=...)` shards its block tables): the step waits for the
    busiest shard."""
    rows, cols = mask.shape
    first, last = _visible_ranges(mask)
    starts = np.arange(0, cols, block_kv)
    ends = np.minimum(starts + block_kv, cols) - 1
    # [rows, key blocks]: row r sees some key of block j
    sees = (first[:, None] <= ends[None, :]) & (last[:, None] >= starts[None, :])
    sees &= (last >= first)[:, None]
    per_q_block = sees.reshape(-1, block_q, len(starts)).any(axis=1).sum(axis=1)
    return int(per_q_block.reshape(q_seq_shards, -1).sum(axis=1).max())


# ---------------------------------------------------------------------------- the kernel
@dataclasses.dataclass(frozen=True)
class _Tiles:
    active: int  # active blocks per head on the busiest shard
    block_q: int
    block_kv: int


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SplashCost:
    """Stands in for `splash_kernel.make_splash_mha(...)`'s kernel in counting compiles: the
    same call, `kernel(q [N, T, D], k, v [K, S, D], segment_ids=None) -> [N, T, D]`, costed as
    splash's blocks. A static pytree, so `context_parallel` can pass it through `shard_map`
    like the real kernel (it holds no arrays to shard: every shard charges the busiest)."""

    tiles: _Tiles

    @classmethod
    def for_mask(cls, per_head_mask, block_q: int, block_kv: int, q_seq_shards: int = 1):
        return cls(_Tiles(active_blocks(per_head_mask, block_q, block_kv, q_seq_shards),
                          block_q, block_kv))  # fmt: skip

    def manual_sharding_spec(self, sharding):
        del sharding
        return self

    def __call__(self, q, k, v, segment_ids=None):
        del segment_ids  # data-dependent masking skips no block
        return _attend(self.tiles, q, k, v)


def _costs(tiles: _Tiles, q, k):
    n, t, d = q.shape
    s = k.shape[1]
    e = q.dtype.itemsize
    elems = n * tiles.active * tiles.block_q * tiles.block_kv  # score elements computed
    kv_reads = n * tiles.active * tiles.block_kv * d * e * 2  # K and V per active block
    qrow_reads = n * tiles.active * tiles.block_q * (2 * d * e + 2 * 4)  # Q, dO, lse, di
    fwd = pl.CostEstimate(
        flops=4 * d * elems, transcendentals=elems,
        bytes_accessed=n * t * (2 * d * e + 4) + kv_reads,
    )  # fmt: skip
    dq = pl.CostEstimate(
        flops=6 * d * elems, transcendentals=elems,
        bytes_accessed=n * t * (3 * d * e + 2 * 4) + kv_reads,
    )  # fmt: skip
    dkv = pl.CostEstimate(
        flops=8 * d * elems, transcendentals=elems,
        bytes_accessed=n * s * 4 * d * e + qrow_reads,
    )  # fmt: skip
    return fwd, dq, dkv


def _index(g):
    # lax.div, not //: Pallas lowers floor division through sign, which needs a TPU device
    # kind, and counting compiles run on a CPU host.
    return lambda h, i: (jax.lax.div(h, g), 0, 0)


def _forward(tiles: _Tiles, q, k, v):
    n, t, d = q.shape
    g = n // k.shape[0]
    bq = tiles.block_q  # divides the rows each call gets (splash._block)
    fwd, _, _ = _costs(tiles, q, k)

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref):
        del k_ref, v_ref
        o_ref[...] = q_ref[...]
        lse_ref[...] = jnp.zeros(lse_ref.shape, jnp.float32)

    rows = pl.BlockSpec((None, bq, d), lambda h, i: (h, i, 0))
    stub = pl.BlockSpec((None, _STUB_ROWS, d), _index(g))
    return pl.pallas_call(
        body,
        grid=(n, t // bq),
        in_specs=[rows, stub, stub],
        out_specs=[rows, pl.BlockSpec((None, 1, bq), lambda h, i: (h, 0, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((n, 1, t), jnp.float32),
        ],  # fmt: skip
        cost_estimate=fwd,
    )(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(tiles: _Tiles, q, k, v):
    return _forward(tiles, q, k, v)[0]


def _attend_fwd(tiles, q, k, v):
    out, lse = _forward(tiles, q, k, v)
    return out, (q, k, v, out, lse)


def _attend_bwd(tiles, residuals, d_out):
    q, k, v, out, lse = residuals
    n, t, d = q.shape
    kh, s, _ = k.shape
    g = n // kh
    bq = tiles.block_q  # divides the rows each call gets (splash._block)
    bk = tiles.block_kv
    _, dq_cost, dkv_cost = _costs(tiles, q, k)
    # splash computes di = rowsum(dO * O) in XLA before its backward kernels
    di = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, None, :]

    def dq_body(q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref, dq_ref):
        del q_ref, k_ref, v_ref, lse_ref, di_ref
        dq_ref[...] = do_ref[...]

    rows = pl.BlockSpec((None, bq, d), lambda h, i: (h, i, 0))
    row_stats = pl.BlockSpec((None, 1, bq), lambda h, i: (h, 0, i))
    stub = pl.BlockSpec((None, _STUB_ROWS, d), _index(g))
    dq = pl.pallas_call(
        dq_body,
        grid=(n, t // bq),
        in_specs=[rows, stub, stub, row_stats, row_stats, rows],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        cost_estimate=dq_cost,
    )(q, k, v, lse, di, d_out)

    def dkv_body(q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref, dk_ref, dv_ref):
        del q_ref, lse_ref, di_ref, do_ref
        dk_ref[...] = k_ref[...]
        dv_ref[...] = v_ref[...]

    kv_rows = pl.BlockSpec((None, bk, d), lambda h, j: (h, j, 0))
    q_stub = pl.BlockSpec((None, bq, d), lambda h, j: (h * g, 0, 0))
    stats_stub = pl.BlockSpec((None, 1, bq), lambda h, j: (h * g, 0, 0))
    dk, dv = pl.pallas_call(
        dkv_body,
        grid=(kh, s // bk),
        in_specs=[q_stub, kv_rows, kv_rows, stats_stub, stats_stub, q_stub],
        out_specs=[kv_rows, kv_rows],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        cost_estimate=dkv_cost,
    )(q, k, v, lse, di, d_out)
    return dq, dk, dv


_attend.defvjp(_attend_fwd, _attend_bwd)
