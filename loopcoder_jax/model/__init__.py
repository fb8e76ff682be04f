"""The LoopCoder model (Flax Linen)."""

from loopcoder_jax.model.attention import Attention, LoopGate
from loopcoder_jax.model.layers import MLP, RMSNorm, apply_rope, rope_frequencies
from loopcoder_jax.model.loopcoder import DecoderLayer, LoopCoder

__all__ = [
    "MLP",
    "Attention",
    "DecoderLayer",
    "LoopCoder",
    "LoopGate",
    "RMSNorm",
    "apply_rope",
    "rope_frequencies",
]
