"""Attention kernels. `reference` is the XLA path that runs everywhere and defines the truth;
`splash` is the Pallas TPU kernel with the same API. `attention` picks one per call."""

from __future__ import annotations

from loopcoder_jax.config import AttnImpl
from loopcoder_jax.kernels import reference
from loopcoder_jax.kernels.reference import (
    Causal,
    LocalWindow,
    MaskSpec,
    cached_attention,
    prefix_attention,
)

# Keys per block of decode attention when `RuntimeConfig.decode_block` is 0 (auto). Small
# blocks skip the most unused cache but cost a loop iteration each: on CPU an iteration is
# cheap next to reading keys; on TPU/GPU a bigger block keeps the step bandwidth bound.
DECODE_BLOCK_CPU = 64
DECODE_BLOCK_ACCELERATOR = 512


def decode_block(requested: int, cache_length: int | None = None, platform: str | None = None):
    """Keys per block of decode attention (see `prefix_attention`).

    `requested` 0 picks the platform default (the mesh in force, else the default backend).
    With `cache_length`, a length the block does not divide is read as one block.
    """
    if requested:
        block = requested
    else:
        if platform is None:
            from loopcoder_jax.kernels import splash  # imports Pallas: keep it off import path

            platform = splash.mesh_platform()
        block = DECODE_BLOCK_CPU if platform == "cpu" else DECODE_BLOCK_ACCELERATOR
    if cache_length is not None and cache_length % block:
        return cache_length
    return block


def resolve_impl(impl: AttnImpl, q_shape=None, k_shape=None) -> AttnImpl:
    """The kernel a call will use: AUTO means splash when the mesh in force (or the default
    backend) is a TPU, XLA otherwise; splash falls back to XLA for shapes it cannot run (for
    example a prompt length that is not a multiple of 128), see `splash.unsupported_reason`."""
    from loopcoder_jax.kernels import splash  # imports Pallas: keep it off the import path

    if impl == AttnImpl.AUTO:
        impl = AttnImpl.SPLASH if splash.mesh_platform() == "tpu" else AttnImpl.XLA
    if impl == AttnImpl.SPLASH and q_shape is not None:
        if splash.unsupported_reason(q_shape, k_shape) is not None:
            return AttnImpl.XLA
    return impl


def attention(q, k, v, mask: MaskSpec, segment_ids=None, impl: AttnImpl = AttnImpl.XLA):
    """Self-attention (training, prefill) through the kernel `impl` selects.

    Args:
      q: [B, T, N, H] post-RoPE queries; k, v: [B, T, K, H].
      mask: `Causal()` or `LocalWindow(W)`.
      segment_ids: optional [B, T] int; attention never crosses a segment boundary.
      impl: `AttnImpl.XLA`, `SPLASH` or `AUTO` (see `resolve_impl`).
    Returns:
      [B, T, N, H].
    """
    from loopcoder_jax.kernels import context_parallel, cost_standin

    if cost_standin.active() and context_parallel.sequence_shards() == 1:
        return cost_standin.attention(q, k, v, mask, segment_ids)  # a planner counting compile
    if context_parallel.sequence_shards() > 1:  # the sequence is sharded over the mesh
        return context_parallel.attention(q, k, v, mask, segment_ids, impl)
    if resolve_impl(impl, q.shape, k.shape) == AttnImpl.SPLASH:
        from loopcoder_jax.kernels import splash

        return splash.attention(q, k, v, mask, segment_ids)
    return reference.attention(q, k, v, mask, segment_ids)


__all__ = [
    "Causal",
    "LocalWindow",
    "MaskSpec",
    "attention",
    "cached_attention",
    "decode_block",
    "prefix_attention",
    "resolve_impl",
]
