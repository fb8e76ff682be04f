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

import jax.numpy as jnp

from loopcoder_jax.kernels.reference import (
    cached_attention,
    causal_cache_attention,
)

# The chunk's causal attention against the loop-0 cache is the decode kernel with a position
# per query (decoding is the T = 1 case): one blockwise online-softmax loop for both.
chunk_prefix_attention = causal_cache_attention


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
