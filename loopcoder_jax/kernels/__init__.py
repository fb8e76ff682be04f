"""Attention kernels. `reference` is the XLA path that runs everywhere and defines the truth."""

from loopcoder_jax.kernels.reference import (
    Causal,
    LocalWindow,
    MaskSpec,
    attention,
    attention_with_mask,
)

__all__ = ["Causal", "LocalWindow", "MaskSpec", "attention", "attention_with_mask"]
