"""Attention for chunked prefill: a chunk of T prompt tokens against the cache (XLA path).

A long prompt runs through the model C tokens at a time (`LoopCoder.prefill_chunk`), so its
activations are those of C tokens, not of the whole prompt. Each chunk's queries see:
  * globally (loop 0, and the global branch of loops >= 1): the loop-0 cache prefix plus the
    chunk itself, causally: key j is visible to the query at position p iff j <= p
    (`chunk_prefix_attention`, read block by block with an online softmax, as in decoding;
    a long chunk is cut into query blocks that each read only the key blocks up to their own
    last position, so a chunk costs the causal triangle, not the square);
  * locally (loops >= 1): keys j with p - W < j <= p, some of which are in the ring buffer the
    previous chunk left and the rest in the chunk (`chunk_window_attention`; a chunk longer
    than 2W runs in blocks of W queries against 2W keys, O(T * W)).

Shape legend as in `kernels/reference.py`; T is the chunk length.
"""

from __future__ import annotations

import jax.numpy as jnp

from loopcoder_jax.kernels.reference import (
    cached_attention,
    causal_cache_attention,
)

# Queries per block of `chunk_prefix_attention` (at least the key block): each query block
# reads the key blocks up to its own furthest position.
QUERY_BLOCK = 128


def chunk_prefix_attention(q, k, v, positions, *, block: int, index: tuple = ()):
    """The chunk's causal attention against the loop-0 cache (which already holds the chunk).

    The decode kernel with a position per query (decoding is the T = 1 case), run over query
    blocks of max(QUERY_BLOCK, block) positions: a block reads only the key blocks up to its
    own furthest query, so the keys past it (the upper triangle) are never read. Results are
    those of one `causal_cache_attention` over the whole chunk (a key block every query of a
    block masks adds exactly nothing to its online softmax).

    Args, returns: as `reference.causal_cache_attention` (q [B, T, N, H], positions [B, T]).
    """
    t = q.shape[1]
    qb = max(QUERY_BLOCK, block)
    if t <= qb:
        return causal_cache_attention(q, k, v, positions, block=block, index=index)
    outs = [
        causal_cache_attention(
            q[:, i : i + qb], k, v, positions[:, i : i + qb], block=block, index=index
        )
        for i in range(0, t, qb)
    ]
    return jnp.concatenate(outs, axis=1)


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
      [B, T, N, H]. A chunk of up to 2W tokens attends to all W + T keys at once; a longer
      one runs in blocks of W queries, each against the 2W keys it can see (the block before
      it, or the ring, and itself): O(T * W) for any T.
    """
    b, t, n, h = q.shape
    k, v = k.astype(ring_k.dtype), v.astype(ring_v.dtype)
    if t <= 2 * window:
        keys = jnp.concatenate([ring_k, k], axis=2)  # [B, K, W+T, H]
        vals = jnp.concatenate([ring_v, v], axis=2)
        key_pos = jnp.concatenate([ring_pos, positions], axis=1)[:, None, :]  # [B, 1, W+T]
        p = positions[:, :, None]  # [B, T, 1]
        mask = (key_pos >= 0) & (key_pos <= p) & (key_pos > p - window)  # [B, T, W+T]
        return cached_attention(q, keys, vals, mask)
    w = window
    nb = -(-t // w)
    pad = nb * w - t
    kh = k.shape[1]
    if pad:  # padded keys sit after every real query (positions run on): never visible
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        positions = jnp.concatenate(
            [positions, positions[:, -1:] + 1 + jnp.arange(pad, dtype=positions.dtype)], axis=1
        )

    def blocks(ring, x):  # [B, K, W, H] + [B, K, nb*W, H] -> [B*nb, K, 2W, H]
        x = jnp.concatenate([ring, x], axis=2).reshape(b, kh, nb + 1, w, h)
        x = jnp.concatenate([x[:, :, :-1], x[:, :, 1:]], axis=3)  # block j: keys of j-1, j
        return jnp.swapaxes(x, 1, 2).reshape(b * nb, kh, 2 * w, h)

    key_pos = jnp.concatenate([ring_pos, positions], axis=1).reshape(b, nb + 1, w)
    key_pos = jnp.concatenate([key_pos[:, :-1], key_pos[:, 1:]], axis=2)  # [B, nb, 2W]
    p = positions.reshape(b, nb, w)[..., None]  # [B, nb, W, 1]
    key_pos = key_pos[:, :, None, :]  # [B, nb, 1, 2W]
    mask = (key_pos >= 0) & (key_pos <= p) & (key_pos > p - w)  # [B, nb, W, 2W]
    out = cached_attention(
        q.reshape(b * nb, w, n, h),
        blocks(ring_k, k),
        blocks(ring_v, v),
        mask.reshape(b * nb, w, 2 * w),
    )
    return out.reshape(b, nb * w, n, h)[:, :t]
