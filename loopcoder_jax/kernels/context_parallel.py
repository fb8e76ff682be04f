"""Context parallelism: attention with the sequence sharded over the mesh (DESIGN.md §6).

When the rules map the activations' `length` axis onto mesh axes of size n > 1 (the
`sequence` axis), every chip holds a contiguous chunk of C = T / n positions of q, k, v and
the segment ids. `attention` runs inside `jax.shard_map` and fetches only what its chunk
needs from the other chips:

  * `Causal()` (loop 0, and the global branch of loops >= 1): the keys of ALL earlier
    positions. K/V and the segment ids are all-gathered over the sequence axes (MaxText's
    choice; the gather is transient, and with GQA K/V are N/K times smaller than q).
    Load-balanced: causal work grows with the position, so with contiguous chunks the last
    shard would do (2n - 1) / n of the average. Cut the sequence into 2n halves of
    h = C / 2; shard j computes the queries of halves j and 2n - 1 - j, which need
    (j + 1) + (2n - j) = 2n + 1 key blocks of h: the same on every shard. The query halves
    move there by two `ppermute`s (each shard sends its halves 2j and 2j + 1; both moves are
    permutations of the shards) and the outputs move back the same way, so the data layout
    (halo, positions, segment ids, loss) stays contiguous. `balance=False` keeps the plain
    path: the shard's own chunk against all T keys (the reference the tests compare with).
  * `LocalWindow(W)` (the local branch): only the W positions before the chunk. A halo
    exchange: shard i receives the last positions of shards i-1, i-2, ... (one
    `ppermute` per neighbour; several when W > C) and attends over [halo, own chunk], so the
    branch stays O(T * W) and never gathers the sequence. Shard 0 (and hops past the start
    of the sequence) get a halo whose segment id matches nothing.

Segment ids travel with the tokens, so no attention crosses a segment, also at shard
boundaries; RoPE was applied before (q and k carry their true positions).

Kernels inside the shard: XLA on every backend, or splash (Pallas, TPU) with the right mask
offsets. XLA: the balanced causal branch iterates its 2n + 1 key blocks (unrolled, so the
planner's FLOP count sees them; offsets from the shard index by `dynamic_slice`), with a
flash-style merge of per-block softmax statistics (the position mask cuts only the diagonal
blocks; the segment mask applies to all); the plain path runs the reference core on dense
[C, T] scores. Splash: the
causal kernel is built for a [T, T] causal mask whose rows carry the positions of the
balanced order (`q_seq_shards = n`), and its block-sparsity tables are sharded with the
queries, so each shard skips the key blocks after its two halves; the local kernel sees a
rectangular [C, halo + C] band whose offset is static.

Shape legend as in `kernels/reference.py` (B batch, T sequence, C = T / n local chunk,
N query heads, K kv heads, G = N / K, H head_dim, W window).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from loopcoder_jax import sharding as sh
from loopcoder_jax.config import AttnImpl
from loopcoder_jax.kernels import cost_standin, reference
from loopcoder_jax.kernels.reference import Causal, LocalWindow, MaskSpec

# Segment id of halo positions that do not exist (before the start of the sequence): real
# segment ids are >= 0 and the reference kernel's own padding uses -1 / -2.
_NO_SEGMENT = -3
_LANES = 128  # splash tiles the key axis in multiples of 128


def _context():
    """(mesh, rules) in force; the mesh is None when there is none or it has one device."""
    from loopcoder_jax.kernels import splash  # mesh-context helpers live with the kernel

    return splash._current_mesh(), splash._current_rules()


def _axes(logical, mesh, rules):
    from loopcoder_jax.kernels import splash

    return splash._mesh_axes(logical, rules, mesh)


def _size(mesh, axes) -> int:
    from loopcoder_jax.kernels import splash

    return splash._axis_size(mesh, axes)


def sequence_shards(mesh=None, rules=None) -> int:
    """Ways the activations' sequence is split under the mesh and rules in force (1 = none)."""
    if mesh is None:
        mesh, rules = _context()
    if mesh is None:
        return 1
    return _size(mesh, _axes(sh.LENGTH, mesh, rules))


def _use_splash(impl: AttnImpl, q_shape, k_shape, mesh, rules) -> bool:
    from loopcoder_jax.kernels import splash

    if impl == AttnImpl.AUTO:
        impl = AttnImpl.SPLASH if splash.mesh_platform() == "tpu" else AttnImpl.XLA
    if impl != AttnImpl.SPLASH:
        return False
    return splash.unsupported_reason(q_shape, k_shape, mesh, rules) is None


def attention(
    q,
    k,
    v,
    mask: MaskSpec,
    segment_ids=None,
    impl: AttnImpl = AttnImpl.XLA,
    *,
    interpret: bool | None = None,
    balance: bool = True,
):
    """Self-attention with the sequence sharded (context parallel); same contract as
    `kernels.attention`.

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H] (global shapes, sharded).
      mask: `Causal()` or `LocalWindow(W)`.
      segment_ids: optional [B, T] int; attention never crosses a segment boundary.
      impl: `AttnImpl.XLA`, `SPLASH` or `AUTO` (splash on TPU); splash falls back to XLA
        for shapes it cannot run (`splash.unsupported_reason`).
      interpret: splash only: run the Pallas interpreter (default: when not on TPU).
      balance: causal mask only: balance the causal work over the shards (the query halves
        are exchanged, see the module docstring); False runs the plain path, in which each
        shard attends its contiguous chunk to all T keys (the reference for the tests).
    Returns:
      [B, T, N, H], sharded like q.
    """
    mesh, rules = _context()
    seq = _axes(sh.LENGTH, mesh, rules) if mesh is not None else None
    n = _size(mesh, seq) if mesh is not None else 1
    b, t, nh, hd = q.shape
    if n == 1 or t % n:
        # Nothing to split (or a length the shards cannot split, e.g. Flax's one-token init
        # trace): the partitioner's own plan for the plain path is correct, only slower.
        return reference.attention(q, k, v, mask, segment_ids)
    kh = k.shape[2]
    c = t // n
    batch = _axes(sh.BATCH, mesh, rules)
    heads = _axes(sh.ACT_HEADS, mesh, rules)
    kv_heads = _axes(sh.ACT_KV_HEADS, mesh, rules)
    if b % _size(mesh, batch):
        batch = None  # the shard_map boundary gathers the batch: correct, only slower
    if nh % _size(mesh, heads) or kh % _size(mesh, kv_heads) or heads != kv_heads:
        heads = kv_heads = None  # whole GQA groups per shard, or no head split at all
    if segment_ids is None:
        segment_ids = jnp.zeros((b, t), jnp.int32)
    splash_ok = _use_splash(impl, q.shape, k.shape, mesh, rules)
    local_heads = nh // _size(mesh, heads)
    if isinstance(mask, Causal) and balance and c % 2 == 0:
        kernel = None
        if splash_ok:
            kernel = _splash_balanced_kernel(t, n, local_heads, interpret)
        body = functools.partial(_balanced_global_shard, axis=seq, n=n)
    elif isinstance(mask, Causal):
        kernel = None
        if splash_ok:
            kernel = _splash_causal_kernel(t, n, local_heads, interpret)
        body = functools.partial(_global_shard, axis=seq)
    elif isinstance(mask, LocalWindow):
        halo = min(mask.window, (n - 1) * c)
        kernel = None
        if splash_ok:
            halo = min(_round_up(mask.window, _LANES), (n - 1) * c)
            kernel = _splash_local_kernel(c, halo, mask.window, local_heads, interpret)
        body = functools.partial(_local_shard, axis=seq, n=n, window=mask.window, halo=halo)
    else:
        raise TypeError(f"Unknown mask spec {mask!r}")
    q_spec = PartitionSpec(batch, seq, heads, None)
    kv_spec = PartitionSpec(batch, seq, kv_heads, None)
    seg_spec = PartitionSpec(batch, seq)
    args, specs = [q, k, v, segment_ids], [q_spec, kv_spec, kv_spec, seg_spec]
    if kernel is not None:
        # The kernel is a pytree of mask tables: sharded rows for the causal one, whole for
        # the local band (it is the same on every shard).
        args.append(kernel)
        specs.append(_kernel_spec(kernel, mesh, seq, sharded=isinstance(mask, Causal)))
    else:
        body = functools.partial(_no_kernel, body)
    fn = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)
    return fn(*args)


def _no_kernel(body, q, k, v, seg):
    return body(q, k, v, seg, None)


# ---------------------------------------------------------------------------- per shard
def _global_shard(q, k, v, seg, kernel, *, axis):
    """Causal attention of this shard's C queries against all T keys (gathered)."""
    c = q.shape[1]
    k_all = jax.lax.all_gather(k, axis, axis=1, tiled=True)  # [B, T, K, H]
    v_all = jax.lax.all_gather(v, axis, axis=1, tiled=True)
    seg_all = jax.lax.all_gather(seg, axis, axis=1, tiled=True)  # [B, T]
    if kernel is not None:
        return _splash_call(kernel, q, k_all, v_all, seg, seg_all)
    offset = jax.lax.axis_index(axis) * c
    # Long chunks go in query blocks, each rematerialised in the backward pass, so the float32
    # scores live one [B, N, Cq, T] block at a time (40B at 32K: 2.5 GiB instead of 40 GiB
    # per chip). The blocks are unrolled, not scanned: the planner's FLOP counts see them all.
    cq = _query_block(c, k_all.shape[1])
    if cq == c:
        return _causal_block(q, k_all, v_all, seg, seg_all, offset)
    block = jax.checkpoint(_causal_block)
    outs = [
        block(q[:, i : i + cq], k_all, v_all, seg[:, i : i + cq], seg_all, offset + i)
        for i in range(0, c, cq)
    ]
    return jnp.concatenate(outs, axis=1)


# Score elements per row and head of one query block of the XLA global branch.
_SCORE_BLOCK = 1 << 24


def _query_block(c: int, t: int) -> int:
    """Largest divisor of C with Cq * T <= _SCORE_BLOCK (C itself when it fits)."""
    cq = c
    while cq * t > _SCORE_BLOCK and cq % 2 == 0:
        cq //= 2
    return cq


def _causal_block(q, k_all, v_all, seg, seg_all, offset):
    """Queries at global positions offset .. offset + Cq - 1 against all T keys."""
    q_pos = offset + jnp.arange(q.shape[1])
    k_pos = jnp.arange(k_all.shape[1])
    visible = (q_pos[:, None] >= k_pos[None, :])[None]  # [1, Cq, T]
    visible = visible & (seg[:, :, None] == seg_all[:, None, :])
    return _attend(q, k_all, v_all, visible)


# ---------------------------------------------------------------------------- balanced causal
# Shard i holds the contiguous chunk i = halves 2i and 2i + 1 (h = C / 2 positions each) of
# the 2n halves of the sequence. Causal work grows with the position, so the balanced branch
# lets shard j compute the queries of halves j and 2n - 1 - j instead: every shard then has
# (j + 1) + (2n - j) = 2n + 1 key blocks of h to look at. Each shard sends its half 2i + s
# (slot s = 0, 1) to the shard that computes it; the two moves are permutations of the
# shards, so they are two ppermutes (and two back for the outputs).
def _balanced_sends(n: int):
    """(slot 0 pairs, slot 1 pairs): where shard s sends its halves 2s and 2s + 1."""
    home = lambda x: x if x < n else 2 * n - 1 - x  # the shard that computes half x
    return [(s, home(2 * s)) for s in range(n)], [(s, home(2 * s + 1)) for s in range(n)]


def _received_halves(j, n: int, xp=jnp):
    """Halves whose queries shard j computes, in the order it holds them: (from slot 0, from
    slot 1). An even j gets its own half j through slot 0, an odd one through slot 1.
    `xp`: jnp for a traced shard index, np for a static one."""
    even = j % 2 == 0
    return xp.where(even, j, 2 * n - 1 - j), xp.where(even, 2 * n - 1 - j, j)


def _balanced_positions(t: int, n: int) -> np.ndarray:
    """[T] global position of every query row in the balanced order (shard j's C rows are
    its two received halves): the splash mask's row order."""
    h = t // (2 * n)
    rows = []
    for j in range(n):
        for half in _received_halves(j, n, np):
            rows.append(int(half) * h + np.arange(h))
    return np.concatenate(rows).astype(np.int32)


def _to_balanced(x, axis, n: int):
    """[B, C, ...] own chunk -> [B, C, ...] the two halves this shard computes."""
    h = x.shape[1] // 2
    send0, send1 = _balanced_sends(n)
    r0 = jax.lax.ppermute(x[:, :h], axis, send0)
    r1 = jax.lax.ppermute(x[:, h:], axis, send1)
    return jnp.concatenate([r0, r1], axis=1)


def _from_balanced(x, axis, n: int):
    """Inverse of `_to_balanced`: each computed half goes back to the shard that holds it."""
    h = x.shape[1] // 2
    send0, send1 = _balanced_sends(n)
    back0 = jax.lax.ppermute(x[:, :h], axis, [(d, s) for s, d in send0])
    back1 = jax.lax.ppermute(x[:, h:], axis, [(d, s) for s, d in send1])
    return jnp.concatenate([back0, back1], axis=1)


def _balanced_global_shard(q, k, v, seg, kernel, *, axis, n):
    """Causal attention, balanced: this shard computes the queries of halves j and
    2n - 1 - j (moved here and back by ppermute) against all T keys (gathered)."""
    k_all = jax.lax.all_gather(k, axis, axis=1, tiled=True)  # [B, T, K, H]
    v_all = jax.lax.all_gather(v, axis, axis=1, tiled=True)
    seg_all = jax.lax.all_gather(seg, axis, axis=1, tiled=True)  # [B, T]
    q_b, seg_b = _to_balanced(q, axis, n), _to_balanced(seg, axis, n)
    if kernel is not None:
        out = _splash_call(kernel, q_b, k_all, v_all, seg_b, seg_all)
    else:
        halves = _received_halves(jax.lax.axis_index(axis), n)
        out = _balanced_causal(q_b, k_all, v_all, seg_b, seg_all, halves)
    return _from_balanced(out, axis, n)


def _sub_block(h: int) -> int:
    """Query / key block of the balanced XLA branch: the largest divisor of h (halving) with
    Bq * Bq <= _SCORE_BLOCK (h itself when it fits)."""
    bq = h
    while bq * bq > _SCORE_BLOCK and bq % 2 == 0:
        bq //= 2
    return bq


def _balanced_causal(q, k_all, v_all, seg_q, seg_all, halves):
    """The XLA balanced causal kernel of one shard: only the key blocks at or before each
    query block, the same static number of them on every shard.

    Args:
      q: [B, C, N, H] queries of two halves (h = C / 2 rows each) of the sequence.
      k_all, v_all: [B, T, K, H] all keys; seg_q [B, C], seg_all [B, T].
      halves: (traced) indices of the two halves in the sequence; they sum to 2n - 1.
    Returns:
      [B, C, N, H].

    The halves are cut into m query blocks of Bq rows and the keys into blocks of Bq. Query
    block r of half a (global block a*m + r) sees key blocks 0 .. a*m + r; paired with query
    block r of the other half b that is (a + b)*m + 2r + 2 = (2n - 1)*m + 2r + 2 key blocks:
    static, so the pair's loop is unrolled (the planner counts every block) with the key
    offsets and the query block taken dynamically from the shard index. Every (query, key)
    block yields its row max, sum and unnormalised output (rematerialised in the backward
    pass, so one block of scores lives at a time); the blocks of a query block are merged
    like a flash-attention online softmax, in one step. Only the diagonal blocks are really
    masked by position; segment ids apply everywhere.
    """
    b, c, nh, hd = q.shape
    t, kh = k_all.shape[1], k_all.shape[2]
    h, n = c // 2, t // c
    bq = _sub_block(h)
    m = h // bq
    qg = reference._group(q, kh)  # [B, C, K, G, H]
    # The score dtype is bound here, outside the checkpointed function: jax caches the traced
    # block per function, and a counting compile must not reuse a float32 trace (or back).
    score_dtype = q.dtype if cost_standin.active() else jnp.float32
    block = jax.checkpoint(functools.partial(_block_stats, score_dtype=score_dtype))
    halves_out = [[], []]
    for r in range(m):
        rows = [slice(r * bq, (r + 1) * bq), slice(h + r * bq, h + (r + 1) * bq)]
        qs = [qg[:, rows[0]], qg[:, rows[1]]]
        ss = [seg_q[:, rows[0]], seg_q[:, rows[1]]]
        first = halves[0] * m + r  # global block index of query block r of each half
        second = halves[1] * m + r
        stats = []
        for s in range(2 * n * m - m + 2 * r + 2):
            in_first = s <= first
            kb = jnp.where(in_first, s, s - first - 1)  # key block index
            q_start = jnp.where(in_first, first, second) * bq
            k_blk, v_blk, seg_k = (
                jax.lax.dynamic_slice_in_dim(x, kb * bq, bq, axis=1)
                for x in (k_all, v_all, seg_all)
            )
            q_blk = jnp.where(in_first, qs[0], qs[1])
            seg_blk = jnp.where(in_first, ss[0], ss[1])
            stats.append((in_first, block(q_blk, k_blk, v_blk, seg_blk, seg_k, q_start, kb * bq)))
        for which, member in ((0, lambda f: f), (1, jnp.logical_not)):
            halves_out[which].append(_merge([(member(f), st) for f, st in stats]))
    out = jnp.concatenate(halves_out[0] + halves_out[1], axis=1)  # [B, C, K, G, H]
    return out.reshape(b, c, nh, hd).astype(q.dtype)


def _block_stats(q, k, v, seg_q, seg_k, q_start, k_start, *, score_dtype=jnp.float32):
    """One (query, key) block: (row max, row sum of exp, unnormalised output), float32.

    q: [B, Bq, K, G, H] at positions q_start..; k, v: [B, Bk, K, H] at k_start..
    Returns ([B, K, G, Bq], [B, K, G, Bq], [B, K, G, Bq, H]).
    """
    scale = q.shape[-1] ** -0.5
    # float32 scores (DESIGN.md §1), except in the planner's counting compiles, which cost
    # this path in splash's place: there the scores are in the compute dtype, as in
    # `kernels/cost_standin.py` (splash keeps them in VMEM; the float32 [Bq, Bk] blocks'
    # HBM traffic would be an artefact of the stand-in). Never executed that way.
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=score_dtype)
    scores = scores * jnp.asarray(scale, score_dtype)
    q_pos = q_start + jnp.arange(q.shape[1])
    k_pos = k_start + jnp.arange(k.shape[1])
    visible = (q_pos[:, None] >= k_pos[None, :])[None] & (seg_q[:, :, None] == seg_k[:, None, :])
    masked = (
        reference._MASKED
        if score_dtype == jnp.float32
        else jnp.asarray(jnp.finfo(score_dtype).min / 2, score_dtype)
    )
    scores = jnp.where(visible[:, None, None], scores, masked)
    # Softmax is shift invariant: the shift needs no gradient.
    row_max = jax.lax.stop_gradient(scores.max(axis=-1))
    p = jnp.exp(scores - row_max[..., None])
    out = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    total = p.sum(axis=-1, dtype=jnp.float32)
    return row_max.astype(jnp.float32), total, out


def _merge(parts):
    """Softmax over the union of the key blocks whose flag is set: [B, Bq, K, G, H].

    A row's own position is always visible (same segment, causal), so its merged maximum is a
    real score and fully masked blocks (max = the masked value) get weight exp(-huge) = 0."""
    top = functools.reduce(
        jnp.maximum, [jnp.where(f, mx, reference._MASKED) for f, (mx, _, _) in parts]
    )
    num = den = 0.0
    for f, (mx, total, out) in parts:
        w = jnp.exp(jnp.where(f, mx - top, reference._MASKED))  # 0 for the other half's
        num = num + w[..., None] * out
        den = den + w * total
    out = num / den[..., None]  # [B, K, G, Bq, H]
    return out.transpose(0, 3, 1, 2, 4)


def _local_shard(q, k, v, seg, kernel, *, axis, n, window, halo):
    """Sliding-window attention of this shard's C queries over [halo, own chunk]."""
    c = q.shape[1]
    if halo:
        k_ext = jnp.concatenate([_halo(k, axis, n, halo), k], axis=1)  # [B, halo + C, K, H]
        v_ext = jnp.concatenate([_halo(v, axis, n, halo), v], axis=1)
        seg_ext = jnp.concatenate([_halo(seg, axis, n, halo, fill=_NO_SEGMENT), seg], axis=1)
    else:
        k_ext, v_ext, seg_ext = k, v, seg
    if kernel is not None:
        return _splash_call(kernel, q, k_ext, v_ext, seg, seg_ext)
    # The blockwise O(C * W) reference kernel over the extended chunk; the halo's own query
    # rows are zeros whose outputs are dropped (their cost is halo * 2W, next to C * 2W).
    q_ext = jnp.pad(q, ((0, 0), (halo, 0), (0, 0), (0, 0)))
    # (In the planner's counting compiles, the compute-dtype stand-in: see `_block_stats`.)
    attend = cost_standin.attention if cost_standin.active() else reference.attention
    out = attend(q_ext, k_ext, v_ext, LocalWindow(window), seg_ext)
    return out[:, halo : halo + c]


def _halo(x, axis, n: int, length: int, fill=None):
    """The `length` positions before this shard's chunk: [B, length, ...].

    Hop h brings the last positions of shard i - h in one `ppermute` (shift h), so a window
    wider than a chunk takes several neighbours. Positions before the sequence start are
    zeros, or `fill` (the segment ids: a value no real segment has).
    """
    c = x.shape[1]
    index = jax.lax.axis_index(axis)
    parts, remaining, hop = [], length, 1
    while remaining > 0:
        r = min(c, remaining)
        tail = x[:, c - r :]
        got = jax.lax.ppermute(tail, axis, [(j, j + hop) for j in range(n - hop)])
        if fill is not None:
            got = jnp.where(index >= hop, got, jnp.asarray(fill, got.dtype))
        parts.insert(0, got)  # further hops are earlier positions
        remaining -= r
        hop += 1
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _attend(q, k, v, visible):
    """q [B, C, N, H] against k, v [B, S, K, H] where visible [B, C, S]: the reference core."""
    b, c, nh, hd = q.shape
    # The planner's counting compiles: the compute-dtype core (see `_block_stats`).
    core = cost_standin._dot_product_core if cost_standin.active() else reference._softmax_attend
    out = core(reference._group(q, k.shape[2]), k, v, visible)
    return out.reshape(b, c, nh, hd)


# ---------------------------------------------------------------------------- splash
def _round_up(x: int, m: int) -> int:
    return math.ceil(x / m) * m


def _splash_causal_kernel(t: int, n: int, num_heads: int, interpret):
    from loopcoder_jax.kernels import splash

    block_q = splash._block(t // n, splash._MAX_BLOCK)
    block_kv = splash._block(t, splash._MAX_BLOCK)
    return splash._make_kernel_for(
        splash.splash_mask.CausalMask((t, t)), num_heads, block_q, block_kv,
        _interpret(interpret), q_seq_shards=n,
    )  # fmt: skip


def _splash_balanced_kernel(t: int, n: int, num_heads: int, interpret):
    """The causal kernel over the query rows in the balanced order (`_balanced_positions`):
    a causal mask whose rows carry their true positions, built for all T rows and sharded
    with the queries (`q_seq_shards = n`), so each shard's kernel skips the key blocks after
    its two halves."""
    from loopcoder_jax.kernels import splash

    # A query block inside one half skips the most (one that straddles both halves reads the
    # keys of the later one); the kernel wants multiples of 128 rows.
    h = t // (2 * n)
    block_q = splash._block(h if h % _LANES == 0 else 2 * h, splash._MAX_BLOCK)
    block_kv = splash._block(t, splash._MAX_BLOCK)
    return splash._make_kernel_for(
        _row_positions_causal_mask()((t, t), _balanced_positions(t, n)), num_heads, block_q,
        block_kv, _interpret(interpret), q_seq_shards=n,
    )  # fmt: skip


@functools.cache  # one class (splash is imported lazily: Pallas stays off the import path)
def _row_positions_causal_mask():
    from loopcoder_jax.kernels import splash

    class RowPositionsCausalMask(splash.splash_mask.CausalMask):
        """Causal mask whose query row r sits at position q_positions[r] (key j visible iff
        j <= q_positions[r]). Splash evaluates a computable mask from its `q_sequence`, both
        for the block tables and inside the kernel, so replacing it permutes the rows."""

        def __init__(self, shape, q_positions):
            super().__init__(shape)
            self.q_sequence = np.asarray(q_positions, np.int32)

    return RowPositionsCausalMask


def _splash_local_kernel(c: int, halo: int, window: int, num_heads: int, interpret):
    from loopcoder_jax.kernels import splash

    # Query i of the chunk sits at halo + i of the extended keys: visible iff
    # halo + i - W < j <= halo + i (splash LocalMask: left W - 1, right 0, offset halo).
    band = splash.splash_mask.LocalMask((c, halo + c), (window - 1, 0), offset=halo)
    block_q = splash._block(c, splash._MAX_BLOCK)
    block_kv = splash._block(halo + c, _LANES)
    return splash._make_kernel_for(band, num_heads, block_q, block_kv, _interpret(interpret))


def _interpret(interpret):
    from loopcoder_jax.kernels import splash

    return splash.mesh_platform() != "tpu" if interpret is None else interpret


def _kernel_spec(kernel, mesh, seq, *, sharded: bool):
    if sharded:
        return kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(None, seq)))
    return jax.tree.map(lambda _: PartitionSpec(), kernel)


def _splash_call(kernel, q, k, v, seg_q, seg_kv):
    from loopcoder_jax.kernels import splash

    # Splash applies no softmax scale: fold head_dim ** -0.5 into q (as splash.attention).
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # heads leading
    seg_q, seg_kv = seg_q.astype(jnp.int32), seg_kv.astype(jnp.int32)

    def one_row(q, k, v, sq, skv):
        return kernel(q, k, v, segment_ids=splash.splash_kernel.SegmentIds(sq, skv))

    out = jax.vmap(one_row)(qt, kt, vt, seg_q, seg_kv)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


__all__ = ["attention", "sequence_shards"]
