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
from jax.ad_checkpoint import checkpoint_name

from loopcoder_jax import kernels
from loopcoder_jax import sharding as sh
from loopcoder_jax.config import AttnImpl
from loopcoder_jax.model.layers import REMAT_OUT, REMAT_QKV, Einsum, apply_rope

Dtype = Any


class LoopGate(nn.Module):
    """Per-head mixing gate: out = g * global + (1 - g) * local, g in [0, 1] per head.

    gate_type "query" (the released model): g = sigmoid(einsum('btnh,nh->btn', q, W) + b),
      q the post-RoPE query; W [N, H], b [N]; HF names `model.gate_projections.{i}.*`. The
      official init is zeros (g = 0.5).
    gate_type "fixed" (ablation): g = 0.5, no parameters.
    gate_type "hidden" (ablation): g = sigmoid(einsum('btd,dn->btn', x, W) + b), x the normed
      layer input; W [D, N], b [N].
    """

    num_heads: int
    head_dim: int
    gate_type: str = "query"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, x, global_out, local_out):
        """q: [B, T, N, H]; x: [B, T, D]; global_out, local_out: [B, T, N, H] -> [B, T, N, H]."""
        if self.gate_type == "fixed":
            g = jnp.float32(0.5)
        else:
            if self.gate_type == "query":
                shape, names, spec, src = (
                    (self.num_heads, self.head_dim),
                    (sh.HEADS, sh.HEAD_DIM),
                    "btnh,nh->btn",
                    q,
                )
            else:
                shape, names, spec, src = (
                    (x.shape[-1], self.num_heads),
                    (sh.EMBED, sh.HEADS),
                    "btd,dn->btn",
                    x,
                )
            kernel = self.param(
                "kernel", nn.with_logical_partitioning(nn.initializers.zeros, names), shape,
                self.param_dtype,
            )  # fmt: skip
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (sh.HEADS,)),
                (self.num_heads,),
                self.param_dtype,
            )
            # float32 island: the gate is a tiny reduction whose sigmoid saturates in bf16.
            logit = jnp.einsum(spec, src.astype(jnp.float32), kernel.astype(jnp.float32))
            g = jax.nn.sigmoid(logit + bias.astype(jnp.float32))[..., None]
        mixed = g * global_out.astype(jnp.float32) + (1.0 - g) * local_out.astype(jnp.float32)
        return mixed.astype(global_out.dtype)


class Attention(nn.Module):
    """q/k/v/o projections (HF names) and the loop-dependent attention pattern."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int
    gate_type: str = "query"
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: AttnImpl = AttnImpl.XLA  # kernel for the full-sequence branches
    decode_block: int = 0  # keys per block of decode attention (RuntimeConfig.decode_block)

    def setup(self):
        d, n, k, h = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim

        def proj(shape, equation, names):
            return Einsum(shape, equation, names, self.init_std, self.dtype, self.param_dtype)

        self.q_proj = proj((d, n, h), "btd,dnh->btnh", (sh.EMBED, sh.HEADS, sh.HEAD_DIM))
        self.k_proj = proj((d, k, h), "btd,dkh->btkh", (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM))
        self.v_proj = proj((d, k, h), "btd,dkh->btkh", (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM))
        self.o_proj = proj((n, h, d), "btnh,nhd->btd", (sh.HEADS, sh.HEAD_DIM, sh.EMBED))
        self.loop_gate = LoopGate(n, h, self.gate_type, param_dtype=self.param_dtype)

    def _qkv(self, x, cos, sin):
        named = lambda y: checkpoint_name(y, REMAT_QKV)  # remat policies
        q = apply_rope(named(self.q_proj(x)), cos, sin)  # [B, T, N, H]
        k = apply_rope(named(self.k_proj(x)), cos, sin)  # [B, T, K, H]
        v = named(self.v_proj(x))
        q = nn.with_logical_constraint(q, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.HEAD_DIM))
        k = nn.with_logical_constraint(k, (sh.BATCH, sh.LENGTH, sh.ACT_KV_HEADS, sh.HEAD_DIM))
        v = nn.with_logical_constraint(v, (sh.BATCH, sh.LENGTH, sh.ACT_KV_HEADS, sh.HEAD_DIM))
        return q, k, v

    def _out(self, a):
        out = checkpoint_name(self.o_proj(a), REMAT_OUT)
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
            global_out = kernels.attention(q, k0, v0, kernels.Causal(), segment_ids, self.attn_impl)
            local_out = kernels.attention(
                q, k, v, kernels.LocalWindow(self.window), segment_ids, self.attn_impl
            )
            a = self.loop_gate(q, x, global_out, local_out)
        return self._out(a), (k, v)

    def decode(self, x, cos, sin, *, loop_idx: int, pos, layer, global_kv, ring_kv=None):
        """One new token per row against the caches (DESIGN.md "Incremental decoding").

        The caches come whole, stacked over layers, and go back with this layer's slot written
        in place: slicing one layer out and stacking it back (scan xs/ys) would copy the whole
        cache on every step.

        Args:
          x: [B, 1, D]; cos, sin: [B, 1, 1, H].
          pos: [B] int32 position of the new token in each row.
          layer: int32 scalar, this layer's index into the stacked caches.
          global_kv: loop-0 caches (k, v), each [L, B, K, S, H]. Loop 0 writes the new token
            into it; loops >= 1 read it (it already holds this token).
          ring_kv: this loop's ring buffers (k, v), each [L, B, K, W, H]; slot = position % W.
        Returns:
          ([B, 1, D], updated cache pair): the global pair for loop 0, the ring pair otherwise.
        """
        q, k, v = self._qkv(x, cos, sin)
        rows = jnp.arange(x.shape[0])
        gk, gv = global_kv
        # x[layer, rows, :, pos] is [B, K, H]: row b's slot at its own position, every kv head.
        if loop_idx == 0:
            gk = gk.at[layer, rows, :, pos].set(k[:, 0].astype(gk.dtype))
            gv = gv.at[layer, rows, :, pos].set(v[:, 0].astype(gv.dtype))
        # Only the filled prefix (positions <= pos) is read, block by block.
        block = kernels.decode_block(self.decode_block, gk.shape[3])
        global_out = kernels.prefix_attention(q, gk, gv, pos + 1, block=block, index=(layer,))
        if loop_idx == 0:
            return self._out(global_out), (gk, gv)
        rk, rv = ring_kv
        w = rk.shape[3]
        rk = rk.at[layer, rows, :, pos % w].set(k[:, 0].astype(rk.dtype))
        rv = rv.at[layer, rows, :, pos % w].set(v[:, 0].astype(rv.dtype))
        # Slot r holds the newest position <= pos that is congruent to r mod W; all W slots
        # are inside the window by construction, only slots never written (< 0) are masked.
        slot_pos = pos[:, None] - (pos[:, None] - jnp.arange(w)[None, :]) % w  # [B, W]
        visible = (slot_pos >= 0)[:, None, :]
        local_out = kernels.cached_attention(q, rk[layer], rv[layer], visible)
        return self._out(self.loop_gate(q, x, global_out, local_out)), (rk, rv)

    def prefill_chunk(
        self, x, cos, sin, *, loop_idx: int, positions, chunk_lengths, layer, global_kv,
        ring_kv=None,
    ):  # fmt: skip
        """A chunk of T prompt tokens per row against the caches (chunked prefill).

        Like `decode` with T tokens: loop 0 writes the chunk's K/V into the global cache at
        `positions` and attends causally to the filled prefix; loops >= 1 attend globally to
        that cache and locally to the ring (the W tokens before the chunk) plus the chunk,
        then leave the ring holding the last W tokens of the row's valid part of the chunk.

        Args:
          x: [B, T, D]; cos, sin: [B, T, 1, H].
          positions: [B, T] int32, row b's chunk sits at lengths[b] + 0 .. T-1.
          chunk_lengths: [B] int32 valid tokens of each row's chunk (the rest is padding,
            written past the row's length, where later tokens overwrite it before it is read).
          layer, global_kv, ring_kv: as in `decode`.
        Returns:
          ([B, T, D], updated cache pair).
        """
        from loopcoder_jax.kernels import chunked  # the chunked-prefill kernels

        q, k, v = self._qkv(x, cos, sin)
        rows = jnp.arange(x.shape[0])[:, None]
        gk, gv = global_kv
        if loop_idx == 0:
            # x[layer, rows, :, positions] is [B, T, K, H]; positions past S are dropped.
            gk = gk.at[layer, rows, :, positions].set(k.astype(gk.dtype), mode="drop")
            gv = gv.at[layer, rows, :, positions].set(v.astype(gv.dtype), mode="drop")
        block = kernels.decode_block(self.decode_block, gk.shape[3])
        global_out = chunked.chunk_prefix_attention(
            q, gk, gv, positions, block=block, index=(layer,)
        )
        if loop_idx == 0:
            return self._out(global_out), (gk, gv)
        rk, rv = ring_kv
        w = rk.shape[3]
        start = positions[:, 0]
        kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, T, H]
        local_out = chunked.chunk_window_attention(
            q, rk[layer], rv[layer], chunked.ring_positions(start, w), kt, vt, positions, w
        )
        # New ring: slot r takes the newest valid position congruent to r, from the chunk when
        # that position is in it, else it keeps what it held.
        new_pos = chunked.ring_positions(start + chunk_lengths, w)  # [B, W]
        from_chunk = (new_pos >= start[:, None])[:, None, :, None]
        idx = jnp.clip(new_pos - start[:, None], 0, x.shape[1] - 1)[:, None, :, None]

        def roll(ring, new):  # ring [L, B, K, W, H], new [B, K, T, H]
            picked = jnp.take_along_axis(new, idx, axis=2).astype(ring.dtype)  # [B, K, W, H]
            return ring.at[layer].set(jnp.where(from_chunk, picked, ring[layer]))

        rk, rv = roll(rk, kt), roll(rv, vt)
        return self._out(self.loop_gate(q, x, global_out, local_out)), (rk, rv)
