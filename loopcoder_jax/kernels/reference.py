"""Attention on the XLA path: the numerical reference every faster kernel is tested against.

Shape legend: B batch, T query length, S key length, K kv heads, G query heads per kv head
(N = K * G), H head_dim, W local window, C block length.

Both LoopCoder branches go through `attention(q, k, v, mask, segment_ids)`:
  * `Causal()`        key j visible to query i iff j <= i               (loop 0, global branch)
  * `LocalWindow(W)`  key j visible to query i iff i - W < j <= i       (local branch)
and, when `segment_ids` is given, only within the same segment (packed rows).

The causal kernel is ordinary dense attention (O(T*S)). The local kernel is blockwise: the
sequence is cut into blocks of C = W queries, and each block attends to its own block and
the previous one (2W keys), so it costs O(T*W) instead of O(T^2) (DESIGN.md §3).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Causal:
    """Key j is visible to query i iff j <= i."""


@dataclasses.dataclass(frozen=True)
class LocalWindow:
    """Key j is visible to query i iff i - window < j <= i."""

    window: int


MaskSpec = Causal | LocalWindow

# Masked scores are set to the most negative float32 rather than -inf, so a row with no
# visible key (only padding rows can have one) yields a finite uniform average, not NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


def _softmax_attend(q, k, v, mask):
    """Masked softmax attention core, shared by every path.

    Args:
      q: [..., T, K, G, H] queries (already in compute dtype).
      k, v: [..., S, K, H].
      mask: bool, broadcastable to [..., T, S].
    Returns:
      [..., T, K, G, H] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    # Scores and softmax in float32 whatever the compute dtype (DESIGN.md §1).
    scores = jnp.einsum("...tkgh,...skh->...kgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    mask = jnp.expand_dims(mask, (-4, -3))  # [..., 1, 1, T, S] against [..., K, G, T, S]
    scores = jnp.where(mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("...kgts,...skh->...tkgh", probs.astype(v.dtype), v)
    return out.astype(q.dtype)


def _group(q, num_kv_heads):
    """[B, T, N, H] -> [B, T, K, G, H] (query heads grouped by the kv head they share)."""
    b, t, n, h = q.shape
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def _causal(q, k, v, segment_ids, core=_softmax_attend):
    t, s = q.shape[1], k.shape[1]
    mask = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]  # [T, S]
    mask = mask[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return core(q, k, v, mask)


def _local_blockwise(q, k, v, window, segment_ids, core=_softmax_attend):
    """Sliding-window attention in blocks of C = W queries against 2W keys: O(T * W)."""
    b, t, kh, g, h = q.shape
    c = window
    nb = math.ceil(t / c)
    pad = nb * c - t
    if segment_ids is None:
        segment_ids = jnp.zeros((b, t), jnp.int32)
    # Padded tail positions get segment -1 so real queries never see them; the missing
    # block before block 0 gets -2 so nobody sees it.
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    qb = q.reshape(b, nb, c, kh, g, h)
    kb = k.reshape(b, nb, c, kh, h)
    vb = v.reshape(b, nb, c, kh, h)
    sb = segment_ids.reshape(b, nb, c)

    def with_previous_block(x, fill):
        prev = jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return jnp.concatenate([prev[:, :-1], x], axis=2)  # [B, nb, 2C, ...]

    kw = with_previous_block(kb, 0)
    vw = with_previous_block(vb, 0)
    sw = with_previous_block(sb, -2)
    # Query a of block n sits at n*C + a; key s of the window at (n-1)*C + s; their distance
    # is a + C - s and the key is visible iff 0 <= distance < W.
    dist = jnp.arange(c)[:, None] + c - jnp.arange(2 * c)[None, :]  # [C, 2C]
    band = (dist >= 0) & (dist < window)
    mask = band[None, None] & (sb[..., :, None] == sw[..., None, :])  # [B, nb, C, 2C]
    out = core(qb, kw, vw, mask)  # [B, nb, C, K, G, H]
    return out.reshape(b, nb * c, kh, g, h)[:, :t]


def attention(q, k, v, mask: MaskSpec, segment_ids=None):
    """Self-attention over one sequence (training and prefill).

    Args:
      q: [B, T, N, H] post-RoPE queries.
      k, v: [B, T, K, H] post-RoPE keys and values of the same positions (N % K == 0).
      mask: `Causal()` or `LocalWindow(W)`.
      segment_ids: optional [B, T] int; attention never crosses a segment boundary.
    Returns:
      [B, T, N, H].
    """
    return _masked_attention(q, k, v, mask, segment_ids, _softmax_attend)


def _masked_attention(q, k, v, mask: MaskSpec, segment_ids, core):
    """`attention` with the softmax core `core(q, k, v, bool_mask)` (`_softmax_attend`'s
    signature): the masking and blocking stay shared with the planner's cost stand-in
    (`kernels/cost_standin.py`), which swaps only the core."""
    b, t, n, h = q.shape
    qg = _group(q, k.shape[2])
    if isinstance(mask, Causal):
        out = _causal(qg, k, v, segment_ids, core)
    elif isinstance(mask, LocalWindow):
        if mask.window >= t:  # the window covers everything: plain causal is cheaper
            out = _causal(qg, k, v, segment_ids, core)
        else:
            out = _local_blockwise(qg, k, v, mask.window, segment_ids, core)
    else:
        raise TypeError(f"Unknown mask spec {mask!r}")
    return out.reshape(b, t, n, h)


def cached_attention(q, k, v, mask):
    """Attention of queries against a KV cache or ring buffer (cached decoding).

    The cache is heads-major, [B, K, S, H]: both score and output contractions then run as
    batched (B, K) matmuls on the stored layout. A length-major [B, S, K, H] cache costs a
    transpose of the whole cache on every call (about 4x slower per call at batch 8 on CPU).
    Used for the small ring buffers; the loop-0 cache goes through `prefix_attention`.

    Args:
      q: [B, T, N, H].
      k, v: [B, K, S, H].
      mask: bool [B, T, S], True where the key is visible.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kh = k.shape[1]
    qg = _queries_by_kv_head(q, kh)
    # Scores and softmax in float32 whatever the compute dtype (DESIGN.md §1).
    scores = jax.lax.dot_general(qg, k, _QK_DIMS, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kh, n // kh, t, -1) * h**-0.5  # [B, K, G, T, S]
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, _MASKED), axis=-1)
    probs = probs.astype(v.dtype).reshape(b, kh, -1, probs.shape[-1])
    out = jax.lax.dot_general(probs, v, _PV_DIMS)  # [B, K, G*T, H]
    return _from_kv_heads(out, t).astype(q.dtype)


# Decode attention on a heads-major cache: queries grouped by kv head, [B, K, G*T, H], so both
# products are plain batched (B, K) matmuls, probs @ v with v in its stored [S, H] order
# (letting XLA put v first made it a slow transposed-operand matmul on CPU).
_QK_DIMS = (((3,), (3,)), ((0, 1), (0, 1)))  # [B,K,G*T,H] x [B,K,S,H]: contract H
_PV_DIMS = (((3,), (2,)), ((0, 1), (0, 1)))  # [B,K,G*T,S] x [B,K,S,H]: contract S


def _queries_by_kv_head(q, num_kv_heads):
    """[B, T, N, H] -> [B, K, G*T, H] (row g*T + t: query head k*G + g at position t)."""
    b, t, n, h = q.shape
    return _group(q, num_kv_heads).transpose(0, 2, 3, 1, 4).reshape(b, num_kv_heads, -1, h)


def _from_kv_heads(out, t):
    """Inverse of `_queries_by_kv_head`: [B, K, G*T, H] -> [B, T, N, H]."""
    b, kh, gt, h = out.shape
    out = out.reshape(b, kh, gt // t, t, h).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, kh * (gt // t), h)


def prefix_attention(q, k, v, lengths, *, block: int, index: tuple = ()):
    """Decode attention against each row's filled cache prefix, in blocks of keys.

    Row b's queries see keys 0 .. lengths[b] - 1 of the cache (a decode step: the new token
    sees every earlier position and itself). Keys are read `block` at a time with an online
    softmax (as in flash decoding), and only the blocks up to the longest row are read: a step
    costs O(current length), not O(cache length), so decoding the start of a long cache is as
    cheap as decoding with a short one. Blocks are sliced straight out of a stacked cache
    (`index` picks the leading entries, e.g. the layer), so no whole-layer copy is made.

    Args:
      q: [B, T, N, H] (all T queries of a row see the same keys: T = 1 when decoding).
      k, v: [*I, B, K, S, H] caches, heads-major, with len(I) == len(index); S % block == 0.
      lengths: [B] int32 visible keys per row, 1 <= lengths <= S.
      block: keys per block.
      index: int scalars (traced or static) indexing the leading I axes of k and v.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    positions = jnp.broadcast_to((lengths.astype(jnp.int32) - 1)[:, None], q.shape[:2])
    return causal_cache_attention(q, k, v, positions, block=block, index=index)


def causal_cache_attention(q, k, v, positions, *, block: int, index: tuple = ()):
    """Causal attention of T queries against a heads-major cache that holds their keys.

    The queries' own keys must already be written into the cache at their positions (a decode
    step, T = 1, or a prefill chunk, `kernels/chunked.py`). Keys are read `block` at a time up
    to the furthest query, with an online softmax, so the scores held at once are
    [B, N, T, block], whatever the cache length.

    Args:
      q: [B, T, N, H] queries.
      k, v: [*I, B, K, S, H] caches with len(I) == len(index); S % block == 0.
      positions: [B, T] int32 position of each query (< S); key j visible iff j <= position.
      block: keys per block.
      index: int scalars (traced or static) indexing the leading I axes of k and v.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kh, s = k.shape[-3], k.shape[-2]
    if s % block:
        raise ValueError(f"cache length {s} is not a multiple of the decode block {block}")
    g = n // kh
    qg = _queries_by_kv_head(q, kh)  # [B, K, G*T, H], row g*T + t
    positions = positions.astype(jnp.int32)
    num_blocks = jnp.minimum((jnp.max(positions) + block) // block, s // block)
    lead = len(index)
    sizes = (1,) * lead + (b, kh, block, h)

    def read(cache, start):
        starts = (*index, 0, 0, start, 0)
        return jax.lax.dynamic_slice(cache, starts, sizes).reshape(b, kh, block, h)

    def body(j, carry):
        m, denom, acc = carry
        start = j * block
        kb, vb = read(k, start), read(v, start)
        # Scores, softmax and the running sums in float32 whatever the compute dtype.
        scores = jax.lax.dot_general(qg, kb, _QK_DIMS, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kh, g, t, block) * h**-0.5
        key_pos = start + jnp.arange(block)
        visible = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, block]
        scores = jnp.where(visible[:, None, None], scores, _MASKED).reshape(b, kh, g * t, block)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        p = jnp.exp(scores - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        denom = denom * rescale + p.sum(axis=-1)
        pv = jax.lax.dot_general(
            p.astype(vb.dtype), vb, _PV_DIMS, preferred_element_type=jnp.float32
        )
        return m_new, denom, acc * rescale[..., None] + pv

    init = (
        jnp.full((b, kh, g * t), _MASKED, jnp.float32),
        jnp.zeros((b, kh, g * t), jnp.float32),
        jnp.zeros((b, kh, g * t, h), jnp.float32),
    )
    # Key 0 is visible to every query, so block 0 makes every denominator > 0.
    _, denom, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    return _from_kv_heads(acc / denom[..., None], t).astype(q.dtype)
