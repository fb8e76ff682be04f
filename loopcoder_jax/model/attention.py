"""Grouped-query attention with LoopCoder's gated global/local merge.

Loop 0 is ordinary causal attention and hands its post-RoPE K/V on as the "shared" (global)
K/V of its layer. In loops >= 1 each query attends twice: globally to the loop-0 K/V
(causal) and locally to its own loop's K/V within a window of W keys; `LoopGate` mixes the
two per head (DESIGN.md §1).

Shape legend as in `model/loopcoder.py`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from loopcoder_jax import kernels
from loopcoder_jax import sharding as sh
from loopcoder_jax.config import AttnImpl
from loopcoder_jax.model.layers import apply_rope

Dtype = Any


class LoopGate(nn.Module):
    """Per-head mixing gate: g = sigmoid(einsum('btnh,nh->btn', q, W_g) + b_g).

    `q` is the post-RoPE query. The output is `g * global + (1 - g) * local`. The official
    init is zeros (g = 0.5 everywhere); HF names: `model.gate_projections.{i}.{weight,bias}`.
    """

    num_heads: int
    head_dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, global_out, local_out):
        """q, global_out, local_out: [B, T, N, H] -> [B, T, N, H]."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.zeros, (sh.HEADS, sh.HEAD_DIM)),
            (self.num_heads, self.head_dim),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (sh.HEADS,)),
            (self.num_heads,),
            self.param_dtype,
        )
        # float32 island: the gate is a tiny reduction whose sigmoid saturates in bf16.
        logit = jnp.einsum("btnh,nh->btn", q.astype(jnp.float32), kernel.astype(jnp.float32))
        g = jax.nn.sigmoid(logit + bias.astype(jnp.float32))[..., None]
        mixed = g * global_out.astype(jnp.float32) + (1.0 - g) * local_out.astype(jnp.float32)
        return mixed.astype(global_out.dtype)


class Projection(nn.Module):
    """Bias-free projection contracting the last `n_in` dims of x with a full-rank kernel.

    The kernel is created in its final shape (e.g. [D, N, H]) with its logical axis names.
    (`nn.DenseGeneral` creates a flat kernel and reshapes it, applying the rank-3 logical
    constraint to the rank-2 array, which fails whenever a mesh is set.)
    """

    features: tuple[int, ...]
    n_in: int
    names: tuple[str, ...]
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.names),
            (*in_shape, *self.features),
            self.param_dtype,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ())))


class Attention(nn.Module):
    """q/k/v/o projections (HF names) and the loop-dependent attention pattern."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int
    has_gate: bool
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: AttnImpl = AttnImpl.XLA  # kernel for the full-sequence branches

    def setup(self):
        def proj(features, n_in, names):
            return Projection(
                features=features,
                n_in=n_in,
                names=names,
                init_std=self.init_std,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )

        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = proj((n, h), 1, (sh.EMBED, sh.HEADS, sh.HEAD_DIM))
        self.k_proj = proj((k, h), 1, (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM))
        self.v_proj = proj((k, h), 1, (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM))
        self.o_proj = proj((self.hidden_size,), 2, (sh.HEADS, sh.HEAD_DIM, sh.EMBED))
        if self.has_gate:
            self.loop_gate = LoopGate(n, h, param_dtype=self.param_dtype)

    def _qkv(self, x, cos, sin):
        q = apply_rope(self.q_proj(x), cos, sin)  # [B, T, N, H]
        k = apply_rope(self.k_proj(x), cos, sin)  # [B, T, K, H]
        v = self.v_proj(x)
        q = nn.with_logical_constraint(q, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.HEAD_DIM))
        k = nn.with_logical_constraint(k, (sh.BATCH, sh.LENGTH, sh.ACT_KV_HEADS, sh.HEAD_DIM))
        v = nn.with_logical_constraint(v, (sh.BATCH, sh.LENGTH, sh.ACT_KV_HEADS, sh.HEAD_DIM))
        return q, k, v

    def _out(self, a):
        out = self.o_proj(a)
        return nn.with_logical_constraint(out, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))

    def __call__(self, x, cos, sin, *, loop_idx: int, segment_ids=None, shared_kv=None):
        """Full-sequence attention (training, prefill).

        Args:
          x: [B, T, D] normed hidden states.
          cos, sin: [B, T, 1, H] RoPE tables of the token positions.
          loop_idx: which application of the shared stack this is (static).
          segment_ids: optional [B, T]; no attention crosses a segment.
          shared_kv: loop-0 (k, v) of this layer, each [B, T, K, H]; required when loop_idx > 0.
        Returns:
          ([B, T, D], (k, v)) where (k, v) are this loop's own post-RoPE keys and values.
        """
        q, k, v = self._qkv(x, cos, sin)
        if loop_idx == 0:
            a = kernels.attention(q, k, v, kernels.Causal(), segment_ids, self.attn_impl)
        else:
            k0, v0 = shared_kv
            global_out = kernels.attention(
                q, k0, v0, kernels.Causal(), segment_ids, self.attn_impl
            )
            local_out = kernels.attention(
                q, k, v, kernels.LocalWindow(self.window), segment_ids, self.attn_impl
            )
            a = self.loop_gate(q, global_out, local_out)
        return self._out(a), (k, v)

    def decode(self, x, cos, sin, *, loop_idx: int, pos, global_kv, ring_kv=None):
        """One new token per row against the caches (DESIGN.md "Incremental decoding").

        Args:
          x: [B, 1, D]; cos, sin: [B, 1, 1, H].
          pos: [B] int32 position of the new token in each row.
          global_kv: loop-0 cache (k, v) of this layer, each [B, S, K, H]. Loop 0 writes the
            new token into it; loops >= 1 read it (it already holds this token).
          ring_kv: this loop's ring buffer (k, v), each [B, W, K, H]; slot = position % W.
        Returns:
          ([B, 1, D], updated cache pair): the global pair for loop 0, the ring pair otherwise.
        """
        q, k, v = self._qkv(x, cos, sin)
        rows = jnp.arange(x.shape[0])
        gk, gv = global_kv
        if loop_idx == 0:
            gk = gk.at[rows, pos].set(k[:, 0].astype(gk.dtype))
            gv = gv.at[rows, pos].set(v[:, 0].astype(gv.dtype))
        visible = jnp.arange(gk.shape[1])[None, None, :] <= pos[:, None, None]  # [B, 1, S]
        global_out = kernels.attention_with_mask(q, gk, gv, visible)
        if loop_idx == 0:
            return self._out(global_out), (gk, gv)
        rk, rv = ring_kv
        w = rk.shape[1]
        rk = rk.at[rows, pos % w].set(k[:, 0].astype(rk.dtype))
        rv = rv.at[rows, pos % w].set(v[:, 0].astype(rv.dtype))
        # Slot r holds the newest position <= pos that is congruent to r mod W; all W slots
        # are inside the window by construction, only slots never written (< 0) are masked.
        slot_pos = pos[:, None] - (pos[:, None] - jnp.arange(w)[None, :]) % w  # [B, W]
        local_out = kernels.attention_with_mask(q, rk, rv, (slot_pos >= 0)[:, None, :])
        return self._out(self.loop_gate(q, global_out, local_out)), (rk, rv)
