"""Attention for chunked prefill: a chunk of T prompt tokens against the cache (XLA path).

A long prompt runs through the model C tokens at a time (`LoopCoder.prefill_chunk`), so its
activations are those of C tokens, not of the whole prompt. Each chunk's queries see:
  * globally (loop 0, and the global branch of loops >= 1): the loop-0 cache prefix plus the
    chunk itself, causally: key j is visible to the query at position p iff j <= p
    (`chunk_prefix_attention`, read block by block with an online softmax, as in decoding);
  * locally (loops >= 1): keys j with p - W < j <= p, some of which are in the ring buffer the
    previous chunk left and the rest in the chunk (`chunk_window_attention`).

Shape legend as in `kernels/reference.py`; T is the chunk length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loopcoder_jax.kernels.reference import (
    _MASKED,
    _PV_DIMS,
    _QK_DIMS,
    _from_kv_heads,
    _queries_by_kv_head,
    cached_attention,
)


def chunk_prefix_attention(q, k, v, positions, *, block: int, index: tuple = ()):
    """Causal attention of a chunk's queries against a heads-major cache that holds them.

    The chunk's own keys must already be written into the cache at their positions. Keys are
    read `block` at a time up to the furthest query, with an online softmax, so the scores
    held at once are [B, N, T, block], whatever the cache length.

    Args:
      q: [B, T, N, H] queries of the chunk.
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
        raise ValueError(f"cache length {s} is not a multiple of the block {block}")
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


def ring_positions(next_pos, window: int):
    """[B] next position -> [B, W] position each ring slot holds (slot r: the newest position
    < next_pos congruent to r mod W; negative = never written)."""
    last = (next_pos - 1)[:, None]
    return last - (last - jnp.arange(window)[None, :]) % window


def chunk_window_attention(q, ring_k, ring_v, ring_pos, k, v, positions, window: int):
    """Sliding-window attention of a chunk: key j visible to position p iff p - W < j <= p.

    Args:
      q: [B, T, N, H] queries of the chunk.
      ring_k, ring_v: [B, K, W, H] the ring buffer before the chunk (heads-major).
      ring_pos: [B, W] position each ring slot holds (negative: empty).
      k, v: [B, K, T, H] the chunk's own keys/values (heads-major).
      positions: [B, T] positions of the chunk's tokens (consecutive per row).
      window: W.
    Returns:
      [B, T, N, H]. Costs O(T * (W + T)): meant for chunks of moderate size.
    """
    keys = jnp.concatenate([ring_k, k.astype(ring_k.dtype)], axis=2)  # [B, K, W+T, H]
    vals = jnp.concatenate([ring_v, v.astype(ring_v.dtype)], axis=2)
    key_pos = jnp.concatenate([ring_pos, positions], axis=1)[:, None, :]  # [B, 1, W+T]
    p = positions[:, :, None]  # [B, T, 1]
    mask = (key_pos >= 0) & (key_pos <= p) & (key_pos > p - window)  # [B, T, W+T]
    return cached_attention(q, keys, vals, mask)
