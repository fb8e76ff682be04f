"""Building blocks: RMSNorm, rotary embeddings (rotate_half layout), SwiGLU MLP.

Shape legend as in `model/loopcoder.py`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from loopcoder_jax import sharding as sh

Dtype = Any

# Names of the activations a named remat policy can save (`config.Remat`, the policies in
# model/loopcoder.py): tagged with `jax.ad_checkpoint.checkpoint_name` where they are made.
REMAT_QKV = "qkv_proj"  # q, k, v projection outputs [B, T, N|K, H] (before RoPE)
REMAT_OUT = "out_proj"  # attention output projection [B, T, D]
REMAT_MLP_IN = "mlp_in"  # post-attention RMSNorm output, the MLP's input [B, T, D]


def ones_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.ones(shape, dtype)


class RMSNorm(nn.Module):
    """`scale * x / sqrt(mean(x^2) + eps)`, normalised in float32 and cast back (HF Llama)."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(ones_init, (sh.EMBED,)), (d,), self.param_dtype
        )
        # float32 island: the variance of bf16 activations is too coarse in bf16.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def rope_frequencies(positions, head_dim: int, theta: float):
    """cos/sin tables for RoPE. positions: [B, T] int -> cos, sin: [B, T, 1, H] float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # rotate_half pairs i with i + H/2
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x, cos, sin):
    """Rotates [B, T, heads, H] by RoPE in the HF "rotate_half" layout (not interleaved)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Einsum(nn.Module):
    """Bias-free projection `einsum(equation, x, kernel)` with a logically named kernel.

    Used instead of `nn.DenseGeneral`, whose initializer runs on a flattened 2-D shape: the
    logical names of a [D, N, H] kernel would not match that shape under a mesh.
    """

    shape: tuple[int, ...]
    equation: str
    names: tuple[str, ...]
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.names),
            self.shape,
            self.param_dtype,
        )
        return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


class MLP(nn.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up)). Param names follow HF `mlp.*_proj`."""

    hidden_size: int
    intermediate_size: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        def dense(features, names, name):
            return nn.Dense(
                features,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(self.init_std), names
                ),
                name=name,
            )

        gate = dense(self.intermediate_size, (sh.EMBED, sh.MLP), "gate_proj")(x)
        up = dense(self.intermediate_size, (sh.EMBED, sh.MLP), "up_proj")(x)
        y = nn.silu(gate) * up
        y = nn.with_logical_constraint(y, (sh.BATCH, sh.LENGTH, sh.ACT_MLP))
        return dense(self.hidden_size, (sh.MLP, sh.EMBED), "down_proj")(y)
