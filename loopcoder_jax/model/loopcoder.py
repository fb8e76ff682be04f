"""LoopCoder: one Llama-style layer stack applied `loop_num` times with the same weights.

Shape legend (used in einsums, comments and docstrings across the package):
  B batch, T query length, S key length, D hidden, N query heads, K kv heads, G = N / K,
  H head_dim, F intermediate, V vocab, L layers, W local window.

Where things are:
  * the loop: `LoopCoder.hidden_states`, a plain `for loop_idx in range(loop_num)`;
  * the layer stack: ONE parameter tree `params["layers"]` whose leaves are stacked on a
    leading L axis, iterated with `jax.lax.scan` in `_run_stack` (every loop scans the same
    stacked params; no `nn.scan`, no per-loop copies);
  * the gate: `model/attention.py::LoopGate`;
  * the kernels: `kernels/reference.py` (global = causal, local = sliding window);
  * the sharding: logical names here, mesh mapping in `sharding.py`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from loopcoder_jax import sharding as sh
from loopcoder_jax.cache import LoopCache
from loopcoder_jax.config import AttnImpl, ModelConfig, Remat, RuntimeConfig
from loopcoder_jax.model.attention import Attention
from loopcoder_jax.model.layers import (
    MLP,
    REMAT_MLP_IN,
    REMAT_OUT,
    REMAT_QKV,
    RMSNorm,
    rope_frequencies,
)


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h)). Submodule names follow HF."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int
    loop_num: int
    gate_type: str
    rms_norm_eps: float
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attn_impl: AttnImpl = AttnImpl.XLA
    decode_block: int = 0

    def setup(self):
        norm = functools.partial(
            RMSNorm, eps=self.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
        )
        self.input_layernorm = norm()
        self.self_attn = Attention(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            window=self.window,
            gate_type=self.gate_type,
            init_std=self.init_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attn_impl=self.attn_impl,
            decode_block=self.decode_block,
        )
        self.post_attention_layernorm = norm()
        self.mlp = MLP(
            self.hidden_size,
            self.intermediate_size,
            init_std=self.init_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def _mlp_block(self, h):
        y = checkpoint_name(self.post_attention_layernorm(h), REMAT_MLP_IN)
        h = h + self.mlp(y)
        return nn.with_logical_constraint(h, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))

    def __call__(self, h, cos, sin, *, loop_idx: int, segment_ids=None, shared_kv=None):
        """[B, T, D] -> ([B, T, D], this loop's (k, v), each [B, T, K, H])."""
        a, kv = self.self_attn(
            self.input_layernorm(h),
            cos,
            sin,
            loop_idx=loop_idx,
            segment_ids=segment_ids,
            shared_kv=shared_kv,
        )
        return self._mlp_block(h + a), kv

    def decode(self, h, cos, sin, *, loop_idx: int, pos, layer, global_kv, ring_kv=None):
        """[B, 1, D] -> ([B, 1, D], updated cache pair); see `Attention.decode`."""
        a, kv = self.self_attn.decode(
            self.input_layernorm(h),
            cos,
            sin,
            loop_idx=loop_idx,
            pos=pos,
            layer=layer,
            global_kv=global_kv,
            ring_kv=ring_kv,
        )
        return self._mlp_block(h + a), kv

    def prefill_chunk(self, h, cos, sin, *, loop_idx: int, positions, chunk_lengths, layer,
                      global_kv, ring_kv=None):  # fmt: skip
        """[B, T, D] -> ([B, T, D], updated cache pair); see `Attention.prefill_chunk`."""
        a, kv = self.self_attn.prefill_chunk(
            self.input_layernorm(h),
            cos,
            sin,
            loop_idx=loop_idx,
            positions=positions,
            chunk_lengths=chunk_lengths,
            layer=layer,
            global_kv=global_kv,
            ring_kv=ring_kv,
        )
        return self._mlp_block(h + a), kv

    def init_all_branches(self, h, cos, sin):
        """Runs loop 0 and (if any) a later loop once, so `init` creates every parameter."""
        h0, kv = self(h, cos, sin, loop_idx=0)
        if self.loop_num >= 2:
            self(h0, cos, sin, loop_idx=1, shared_kv=kv)
        return h0


@jax.custom_vjp
def _scale_grad(x, scale):
    return x


def _scale_grad_fwd(x, scale):
    return x, scale


def _scale_grad_bwd(scale, g):
    return jax.tree.map(lambda t: (t * scale).astype(t.dtype), g), None


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)

_save = jax.checkpoint_policies.save_only_these_names
_REMAT_POLICIES = {
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    Remat.SAVE_QKV: _save(REMAT_QKV),
    Remat.SAVE_QKV_OUT: _save(REMAT_QKV, REMAT_OUT),
    Remat.SAVE_QKV_OUT_MLP_IN: _save(REMAT_QKV, REMAT_OUT, REMAT_MLP_IN),
    Remat.OFFLOAD_QKV_OUT: jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[REMAT_QKV, REMAT_OUT],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def _slice_layer(stacked, i):
    return jax.tree.map(lambda x: x[i], stacked)


class LoopCoder(nn.Module):
    """The LoopCoder causal LM.

    `LoopCoder(cfg).apply({"params": params}, input_ids, segment_ids=None, positions=None)`
    returns float32 logits [B, T, V]. Other entry points (via `apply(..., method=...)`):
    `hidden_states`, `logits`, `prefill`, `decode_step`.
    """

    config: ModelConfig
    runtime: RuntimeConfig = RuntimeConfig()

    def setup(self):
        cfg, rt = self.config, self.runtime
        self._dtype = jnp.dtype(rt.dtype)
        self._param_dtype = jnp.dtype(rt.param_dtype)
        init = nn.initializers.normal(stddev=cfg.initializer_range)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self._dtype,
            param_dtype=self._param_dtype,
            embedding_init=nn.with_logical_partitioning(init, (sh.VOCAB, sh.EMBED)),
        )
        self.layers = self.param("layers", self._init_stacked_layers)
        # Ablation only: loops >= 1 get their own stacks ("layers_loop1", ...), same depth.
        self.untied_layers = tuple(
            self.param(f"layers_loop{i}", self._init_stacked_layers)
            for i in range(1, cfg.loop_num if cfg.untied_loops else 1)
        )
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype=self._dtype, param_dtype=self._param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=self._dtype,
                param_dtype=self._param_dtype,
                kernel_init=nn.with_logical_partitioning(init, (sh.EMBED, sh.VOCAB)),
            )

    # ------------------------------------------------------------------ the layer stack
    def _layer(self) -> DecoderLayer:
        cfg = self.config
        # parent=None: a free-standing module applied functionally to one layer's params
        # inside lax.scan, not a child that would own a second copy of the weights.
        return DecoderLayer(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            window=cfg.loop_window_size,
            loop_num=cfg.loop_num,
            gate_type=cfg.gate_type,
            rms_norm_eps=cfg.rms_norm_eps,
            init_std=cfg.initializer_range,
            dtype=self._dtype,
            param_dtype=self._param_dtype,
            attn_impl=self.runtime.attn_impl,
            decode_block=self.runtime.decode_block,
            parent=None,
        )

    def _init_stacked_layers(self, rng):
        """Inits L independent layers and stacks every leaf on a leading `layers` axis."""
        cfg = self.config
        layer = self._layer()
        h = jnp.zeros((1, 1, cfg.hidden_size), self._dtype)
        cos, sin = rope_frequencies(jnp.zeros((1, 1), jnp.int32), cfg.head_dim, cfg.rope_theta)

        def init_one(key):
            return layer.init(key, h, cos, sin, method=DecoderLayer.init_all_branches)["params"]

        stacked = jax.vmap(init_one)(jax.random.split(rng, cfg.num_hidden_layers))
        return jax.tree.map(
            lambda box: box.replace(names=(sh.LAYERS, *box.names)),
            stacked,
            is_leaf=lambda x: isinstance(x, nn.Partitioned),
        )

    def _loop_params(self, loop_idx: int):
        """The stacked layer params a loop runs: the same tree for every loop (LoopCoder),
        unless the untied-loops ablation gives loops >= 1 their own."""
        if loop_idx == 0 or not self.config.untied_loops:
            return self.layers
        return self.untied_layers[loop_idx - 1]

    def _scan_layers(self, body, h, xs):
        """Runs `body(h, (layer_params, *per_layer)) -> (h, y)` over the L layers."""
        if self.runtime.remat != Remat.NONE:
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.runtime.remat])
        if self.runtime.scan_layers:
            return jax.lax.scan(body, h, xs)
        ys = []  # unrolled: for debugging and for FLOP counts (cost_analysis counts a scan once)
        for i in range(self.config.num_hidden_layers):
            h, y = body(h, _slice_layer(xs, i))
            ys.append(y)
        return h, jax.tree.map(lambda *t: jnp.stack(t), *ys)

    def _run_stack(self, h, cos, sin, segment_ids, loop_idx, shared_kv):
        layer = self._layer()

        def body(h, xs):
            params, kv0 = xs
            return layer.apply(
                {"params": params},
                h,
                cos,
                sin,
                loop_idx=loop_idx,
                segment_ids=segment_ids,
                shared_kv=kv0,
            )

        return self._scan_layers(body, h, (self._loop_params(loop_idx), shared_kv))

    # ------------------------------------------------------------------ full sequence
    def hidden_states(self, input_ids, segment_ids=None, positions=None, *, return_kv=False):
        """Final-normed hidden states [B, T, D] (the input to the LM head).

        Args:
          input_ids: [B, T] int token ids.
          segment_ids: optional [B, T] int; packed rows never attend across segments.
          positions: optional [B, T] int RoPE positions (per segment when packed);
            defaults to 0..T-1.
          return_kv: also return each loop's stacked (k, v), each [L, B, T, K, H] (prefill).
        """
        cfg = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_frequencies(positions, cfg.head_dim, cfg.rope_theta)
        h = self.embed_tokens(input_ids)
        h = nn.with_logical_constraint(h, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
        scale = self.runtime.bptt_grad_scale
        shared_kv, loop_kvs = None, []
        for loop_idx in range(cfg.loop_num):  # the SAME stacked params every loop
            if loop_idx > 0 and scale != 1.0:
                h = _scale_grad(h, scale)
            h, kv = self._run_stack(h, cos, sin, segment_ids, loop_idx, shared_kv)
            if loop_idx == 0:
                shared_kv = kv if scale == 1.0 else _scale_grad(kv, scale)
            loop_kvs.append(kv)
        h = self.norm(h)  # once, after the last loop
        return (h, loop_kvs) if return_kv else h

    def logits(self, h):
        """LM head: [B, T, D] -> float32 logits [B, T, V] (tied embeddings if configured)."""
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(h)
        else:
            out = self.lm_head(h)
        out = nn.with_logical_constraint(out, (sh.BATCH, sh.LENGTH, sh.ACT_VOCAB))
        return out.astype(jnp.float32)

    def __call__(self, input_ids, segment_ids=None, positions=None):
        """[B, T] token ids -> float32 logits [B, T, V]."""
        return self.logits(self.hidden_states(input_ids, segment_ids, positions))

    # ------------------------------------------------------------------ cached decoding
    def prefill(self, input_ids, lengths=None, *, max_length: int):
        """Runs the prompt and builds the cache.

        Args:
          input_ids: [B, T] right-padded prompts; row b's prompt is input_ids[b, :lengths[b]].
          lengths: [B] int prompt lengths (default: all T).
          max_length: cache length S >= T (prompt plus the tokens to generate).
        Returns:
          (float32 logits [B, V] at each row's last prompt token, LoopCache).
        """
        cfg = self.config
        b, t = input_ids.shape
        if lengths is None:
            lengths = jnp.full((b,), t, jnp.int32)
        lengths = lengths.astype(jnp.int32)
        # Right padding needs no mask: pads come after every real token, so causality keeps
        # them out of real rows, and decoding overwrites their cache slots in order.
        h, loop_kvs = self.hidden_states(input_ids, return_kv=True)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
        logits = self.logits(last)[:, 0]

        def pad_to_cache(x):  # [L, B, T, K, H] -> [L, B, K, S, H] (heads-major, see cache.py)
            x = jnp.pad(x, ((0, 0), (0, 0), (0, max_length - t), (0, 0), (0, 0)))
            return jnp.swapaxes(x, 2, 3)

        gk, gv = loop_kvs[0]
        w = cfg.loop_window_size
        # Ring slot r holds the newest prompt position congruent to r mod W.
        slot_pos = (lengths - 1)[:, None] - ((lengths - 1)[:, None] - jnp.arange(w)) % w
        slot_pos = jnp.clip(slot_pos, 0, t - 1)  # never-written slots: masked at decode

        def ring(x):  # [L, B, T, K, H] -> [L, B, K, W, H]
            x = jnp.take_along_axis(x, slot_pos[None, :, :, None, None], axis=2)
            return jnp.swapaxes(x, 2, 3)

        rings = [(ring(k), ring(v)) for k, v in loop_kvs[1:]]
        local_k = jnp.stack([k for k, _ in rings]) if rings else self._empty_ring(gk)
        local_v = jnp.stack([v for _, v in rings]) if rings else self._empty_ring(gv)
        cache = LoopCache(
            global_k=pad_to_cache(gk),
            global_v=pad_to_cache(gv),
            local_k=local_k,
            local_v=local_v,
            lengths=lengths,
        )
        return logits, cache

    def _empty_ring(self, like):
        layers, b, k, _, h = like.shape
        return jnp.zeros((0, layers, b, k, self.config.loop_window_size, h), like.dtype)

    def decode_step(self, token_ids, cache: LoopCache):
        """Appends one token per row. token_ids: [B, 1] -> (float32 logits [B, V], cache)."""
        cfg = self.config
        pos = cache.lengths  # [B] position of the new token
        cos, sin = rope_frequencies(pos[:, None], cfg.head_dim, cfg.rope_theta)
        h = self.embed_tokens(token_ids)
        h, new_cache = self._run_cached_stack(
            h, cos, sin, cache, DecoderLayer.decode, scan=self.runtime.scan_layers, pos=pos
        )
        logits = self.logits(self.norm(h))[:, 0]
        return logits, new_cache.replace(lengths=cache.lengths + 1)

    def _run_cached_stack(self, h, cos, sin, cache: LoopCache, method, *, scan: bool, **kw):
        """Every loop of the layer stack over the KV cache (a decode step or a prefill chunk).

        Only the params are scanned over. The cache a loop writes (loop 0: the global K/V;
        later loops: their ring) rides in the carry, each layer writing its own slot in place
        (see `Attention.decode`); the global K/V that later loops only read is closed over, so
        the compiler sees it is not modified and copies nothing. `scan=False` unrolls the
        layers: static layer slices, hoisted out of an enclosing decode loop.
        Returns (h, the cache with its new K/V; lengths unchanged).
        """
        cfg = self.config
        layer = self._layer()
        layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        global_kv = (cache.global_k, cache.global_v)
        local_k, local_v = [], []
        for loop_idx in range(cfg.loop_num):  # the SAME stacked params every loop

            def body(carry, xs, loop_idx=loop_idx, global_kv=global_kv):
                h, kv = carry
                params, i = xs
                if loop_idx == 0:
                    caches = dict(global_kv=kv)
                else:
                    caches = dict(global_kv=global_kv, ring_kv=kv)
                h, kv = layer.apply(
                    {"params": params}, h, cos, sin, loop_idx=loop_idx, layer=i, method=method,
                    **kw, **caches,
                )  # fmt: skip
                return (h, kv), None

            if loop_idx == 0:
                carry = (h, global_kv)
            else:
                carry = (h, (cache.local_k[loop_idx - 1], cache.local_v[loop_idx - 1]))
            if scan:
                xs = (self._loop_params(loop_idx), layer_ids)
                carry, _ = jax.lax.scan(body, carry, xs)
            else:
                for i in range(cfg.num_hidden_layers):
                    carry, _ = body(carry, (_slice_layer(self._loop_params(loop_idx), i), i))
            h, kv = carry
            if loop_idx == 0:
                global_kv = kv
            else:
                local_k.append(kv[0])
                local_v.append(kv[1])
        return h, cache.replace(
            global_k=global_kv[0],
            global_v=global_kv[1],
            local_k=jnp.stack(local_k) if local_k else cache.local_k,
            local_v=jnp.stack(local_v) if local_v else cache.local_v,
        )

    def prefill_chunk(self, token_ids, cache: LoopCache, chunk_lengths=None, *, all_logits=False):
        """Extends the cache by a chunk of T prompt tokens per row (chunked prefill).

        A prompt fed chunk by chunk from an empty cache (`cache.init_cache`) gives the same
        logits and cache as one `prefill`, with activations for T tokens at a time. Row b's
        chunk starts at position cache.lengths[b]; its global queries see the loop-0 cache
        prefix and the chunk causally, its local queries the previous W tokens (partly in the
        ring buffer the previous chunk left).

        Args:
          token_ids: [B, T] int ids, right-padded per row.
          cache: the cache so far (S must exceed every position written that matters).
          chunk_lengths: [B] int valid tokens per row (default T); 0 leaves a row unchanged
            (padding K/V lands past its length, where it is overwritten before being read).
          all_logits: return logits at every chunk position [B, T, V] (for tests), instead of
            at each row's last valid token [B, V].
        Returns:
          (float32 logits, LoopCache with lengths + chunk_lengths).
        """
        cfg = self.config
        b, t = token_ids.shape
        if chunk_lengths is None:
            chunk_lengths = jnp.full((b,), t, jnp.int32)
        chunk_lengths = chunk_lengths.astype(jnp.int32)
        positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        cos, sin = rope_frequencies(positions, cfg.head_dim, cfg.rope_theta)
        h = self.embed_tokens(token_ids)
        h = nn.with_logical_constraint(h, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
        h, new_cache = self._run_cached_stack(
            h, cos, sin, cache, DecoderLayer.prefill_chunk, scan=True,
            positions=positions, chunk_lengths=chunk_lengths,
        )  # fmt: skip
        h = self.norm(h)
        if not all_logits:
            h = jnp.take_along_axis(h, jnp.maximum(chunk_lengths - 1, 0)[:, None, None], axis=1)
        logits = self.logits(h)
        new_cache = new_cache.replace(lengths=cache.lengths + chunk_lengths)
        return (logits if all_logits else logits[:, 0]), new_cache
