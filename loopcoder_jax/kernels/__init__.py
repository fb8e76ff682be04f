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
)


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
    "resolve_impl",
]
