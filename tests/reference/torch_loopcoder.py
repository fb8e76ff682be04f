"""Independent PyTorch reference of LoopCoder (`IQuestLoopCoderForCausalLM`) for parity tests.

Written from shared/DESIGN.md section 1 only. It follows the vLLM/mlx-lm semantics, not the three
defects of the published HF modeling file listed there. Plain torch, no `transformers`.

Shape legend (as in loopcoder_jax): B batch, T query length, S key length, D hidden, N query heads,
K kv heads, G = N/K, H head_dim, F intermediate, V vocab, L layers, W local window.

Public API:
  TorchLoopCoder(hf_config)           forward / init_random_ / prefill / extend / decode_step /
                                      greedy_generate
  llama_forward(state_dict, hf_config, input_ids)   second, plain dense Llama implementation
  save_hf_checkpoint_torch(model, hf_config, out_dir, num_shards, dtype)
  causal_mask, window_mask, masked_attention        the naive primitives used by `forward`
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoopCoderCache",
    "TorchLoopCoder",
    "causal_mask",
    "llama_forward",
    "masked_attention",
    "save_hf_checkpoint_torch",
    "window_mask",
]


def _resolve_config(hf_config: dict) -> dict:
    """Returns hf_config with the optional keys filled in (HF defaults of the released model)."""
    cfg = dict(hf_config)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("rope_theta", 500000.0)
    cfg.setdefault("rms_norm_eps", 1e-5)
    cfg.setdefault("loop_num", 2)
    cfg.setdefault("loop_window_size", 64)
    cfg.setdefault("tie_word_embeddings", False)
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg["loop_num"] < 1 or cfg["loop_window_size"] < 1:
        raise ValueError("loop_num and loop_window_size must be >= 1")
    return cfg


# ---------------------------------------------------------------------------------------------
# Naive primitives.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis. x [..., D], weight [D] -> [..., D] in x.dtype.

    Normalizes in float32 (DESIGN.md), casts back to x.dtype, then scales by weight (Llama's
    order).
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] int -> cos, sin [B, T, H] float32, rotate_half layout (halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, T, H], cos/sin [B, T, H] -> [B, N, T, H] in x.dtype (rotation done in float32)."""
    xf = x.float()
    out = xf * cos[:, None] + _rotate_half(xf) * sin[:, None]
    return out.to(x.dtype)


def causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, T] -> bool [B, T, S=T]: key j visible to query i iff j <= i, same segment."""
    t = segment_ids.shape[1]
    idx = torch.arange(t, device=segment_ids.device)
    causal = idx[:, None] >= idx[None, :]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same_segment


def window_mask(segment_ids: torch.Tensor, window: int) -> torch.Tensor:
    """segment_ids [B, T] -> bool [B, T, T]: visible iff i - W < j <= i and same segment."""
    t = segment_ids.shape[1]
    idx = torch.arange(t, device=segment_ids.device)
    in_window = idx[None, :] > idx[:, None] - window
    return causal_mask(segment_ids) & in_window[None]


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Dense softmax attention with an explicit boolean mask.

    Args:
      q: [B, N, T, H]; k, v: [B, K, S, H] (GQA: query head n reads kv head n // G).
      mask: bool [B, T, S], True = visible.
    Returns:
      [B, N, T, H] in v.dtype. A query row with no visible key returns zeros.
    """
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("bnth,bnsh->bnts", q.float(), k.float()) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # float32 softmax (DESIGN.md)
    # Only padding-like rows can be fully masked; their softmax is NaN, make them contribute 0.
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.einsum("bnts,bnsh->bnth", probs.to(v.dtype), v)


def _attend_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention for decoding, GQA by grouping queries (not by repeating kv).

    q [B, N, T, H]; k, v [B, K, S, H] -> [B, N, T, H]. Every cached key is visible.
    """
    b, n, t, h = q.shape
    kh = k.shape[1]
    qg = q.float().reshape(b, kh, n // kh, t, h)
    scores = torch.einsum("bkgth,bksh->bkgts", qg, k.float()) / math.sqrt(h)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgts,bksh->bkgth", probs, v.float())
    return out.reshape(b, n, t, h).to(v.dtype)


# ---------------------------------------------------------------------------------------------
# Modules: attribute names are chosen so that state_dict() keys are the official HF names.


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class _Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, n, k, h = (
            cfg["hidden_size"],
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
            cfg["head_dim"],
        )
        self.q_proj = nn.Linear(d, n * h, bias=False)
        self.k_proj = nn.Linear(d, k * h, bias=False)
        self.v_proj = nn.Linear(d, k * h, bias=False)
        self.o_proj = nn.Linear(n * h, d, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, f = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = _RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.post_attention_layernorm = _RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class _LoopGate(nn.Module):
    """g = sigmoid(einsum('bnth,nh->bnt', q_post_rope, weight) + bias); weight [N, H], bias [N]."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        # Official init is zeros (g = 0.5); init_random_ replaces them so tests can see the gate.
        self.weight = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, N, T, H] -> g [B, N, T] float32."""
        logits = torch.einsum("bnth,nh->bnt", q.float(), self.weight.float())
        return torch.sigmoid(logits + self.bias.float()[None, :, None])


class _Backbone(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = _RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        if cfg["loop_num"] >= 2:
            # One gate per layer, shared by every loop >= 1 (like the layer weights).
            self.gate_projections = nn.ModuleList(
                _LoopGate(cfg["num_attention_heads"], cfg["head_dim"])
                for _ in range(cfg["num_hidden_layers"])
            )


@dataclasses.dataclass
class LoopCoderCache:
    """Decoding cache (DESIGN.md "Incremental decoding").

    k0[l], v0[l]: [B, K, S, H] loop-0 K/V (post-RoPE) of layer l over all S tokens so far.
    local_k[loop - 1][l], local_v[...]: [B, K, min(S, W), H] K/V of that loop's own layer-l
      projections for the last W tokens (a ring buffer, kept as a trimmed tensor here).
    length: S, the number of tokens already in the cache (= position of the next token).
    """

    k0: list[torch.Tensor]
    v0: list[torch.Tensor]
    local_k: list[list[torch.Tensor]]
    local_v: list[list[torch.Tensor]]
    length: int


class TorchLoopCoder(nn.Module):
    """LoopCoder causal LM: the same L-layer stack applied loop_num times, then norm and lm_head."""

    def __init__(self, hf_config: dict):
        super().__init__()
        self.cfg = _resolve_config(hf_config)
        self.model = _Backbone(self.cfg)
        if not self.cfg["tie_word_embeddings"]:
            self.lm_head = nn.Linear(self.cfg["hidden_size"], self.cfg["vocab_size"], bias=False)

    # -- small shared pieces (projections, norms, MLP); the attention logic is per path ----------

    @property
    def loop_num(self) -> int:
        return self.cfg["loop_num"]

    @property
    def window(self) -> int:
        return self.cfg["loop_window_size"]

    def _qkv(self, layer: _DecoderLayer, h: torch.Tensor, cos, sin):
        """h [B, T, D] -> q [B, N, T, H], k, v [B, K, T, H]; q and k post-RoPE."""
        b, t, _ = h.shape
        hd = self.cfg["head_dim"]
        x = layer.input_layernorm(h)
        attn = layer.self_attn
        q = attn.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _mix(self, layer_idx: int, q, glob, local) -> torch.Tensor:
        """g * glob + (1 - g) * local, g from the post-RoPE q. All [B, N, T, H]."""
        g = self.model.gate_projections[layer_idx](q)[..., None]
        return (g * glob.float() + (1.0 - g) * local.float()).to(glob.dtype)

    def _layer_tail(self, layer: _DecoderLayer, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual o_proj and MLP. h [B, T, D], a [B, N, T, H] -> [B, T, D]."""
        b, n, t, hd = a.shape
        h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(b, t, n * hd))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        if self.cfg["tie_word_embeddings"]:
            return h @ self.model.embed_tokens.weight.T
        return self.lm_head(h)

    # -- full-sequence forward: the naive spec ----------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, segment_ids, positions: [B, T] int -> logits [B, T, V] (module dtype).

        segment_ids default to one segment per row, positions to arange(T). Masks are by token
        index within the row (packed segments are contiguous), RoPE uses `positions`.
        """
        b, t = input_ids.shape
        if segment_ids is None:
            segment_ids = torch.zeros_like(input_ids)
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        cos, sin = rope_cos_sin(positions, self.cfg["head_dim"], self.cfg["rope_theta"])
        full = causal_mask(segment_ids)
        local = window_mask(segment_ids, self.window)

        h = self.model.embed_tokens(input_ids)
        kv0: list[tuple[torch.Tensor, torch.Tensor]] = []
        for loop in range(self.loop_num):
            for li, layer in enumerate(self.model.layers):
                q, k, v = self._qkv(layer, h, cos, sin)
                if loop == 0:
                    kv0.append((k, v))
                    a = masked_attention(q, k, v, full)
                else:
                    k0, v0 = kv0[li]
                    glob = masked_attention(q, k0, v0, full)
                    loc = masked_attention(q, k, v, local)
                    a = self._mix(li, q, glob, loc)
                h = self._layer_tail(layer, h, a)
        return self._logits(h)

    # -- deterministic random init ------------------------------------------------------------

    @torch.no_grad()
    def init_random_(self, seed: int, gate_scale: float = 0.5, std: float = 0.02) -> TorchLoopCoder:
        """Fills every parameter from a seeded generator (independent of the global torch RNG).

        Linear/embedding weights ~ N(0, std); norm weights 1 + 0.1 N(0, 1) (so a missing or
        misplaced norm shows); gate weight and bias gate_scale * N(0, 1) (so g is far from 0.5).
        """
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * noise
            elif ".gate_projections." in name:
                value = gate_scale * noise
            else:
                value = std * noise
            p.copy_(value)
        return self

    # -- cached decoding: written separately from `forward` --------------------------------------

    def _empty_cache(self, batch: int, like: torch.Tensor) -> LoopCoderCache:
        shape = (batch, self.cfg["num_key_value_heads"], 0, self.cfg["head_dim"])
        empty = like.new_zeros(shape)
        n_layers = self.cfg["num_hidden_layers"]
        return LoopCoderCache(
            k0=[empty] * n_layers,
            v0=[empty] * n_layers,
            local_k=[[empty] * n_layers for _ in range(self.loop_num - 1)],
            local_v=[[empty] * n_layers for _ in range(self.loop_num - 1)],
            length=0,
        )

    @torch.no_grad()
    def extend(
        self, input_ids: torch.Tensor, cache: LoopCoderCache | None = None
    ) -> tuple[torch.Tensor, LoopCoderCache]:
        """Runs T new tokens after the S cached ones (chunked prefill).

        input_ids [B, T] -> logits [B, T, V] and a new cache (the input cache is not modified).
        Masks are built on absolute token indices: global keys 0..S+T-1, local keys are the ring
        (indices S-R..S-1) followed by the new tokens.
        """
        b, t = input_ids.shape
        h = self.model.embed_tokens(input_ids)
        if cache is None:
            cache = self._empty_cache(b, h)
        s, w = cache.length, self.window
        q_idx = torch.arange(s, s + t)
        positions = q_idx.expand(b, t)
        cos, sin = rope_cos_sin(positions, self.cfg["head_dim"], self.cfg["rope_theta"])
        new = LoopCoderCache(
            k0=list(cache.k0),
            v0=list(cache.v0),
            local_k=[list(x) for x in cache.local_k],
            local_v=[list(x) for x in cache.local_v],
            length=s + t,
        )
        global_keys = torch.arange(s + t)
        global_mask = (global_keys[None, :] <= q_idx[:, None]).expand(b, t, s + t)
        for loop in range(self.loop_num):
            for li, layer in enumerate(self.model.layers):
                q, k, v = self._qkv(layer, h, cos, sin)
                if loop == 0:
                    new.k0[li] = torch.cat([cache.k0[li], k], dim=2)
                    new.v0[li] = torch.cat([cache.v0[li], v], dim=2)
                    a = masked_attention(q, new.k0[li], new.v0[li], global_mask)
                else:
                    ring_k, ring_v = cache.local_k[loop - 1][li], cache.local_v[loop - 1][li]
                    r = ring_k.shape[2]
                    keys_k = torch.cat([ring_k, k], dim=2)
                    keys_v = torch.cat([ring_v, v], dim=2)
                    key_idx = torch.arange(s - r, s + t)
                    local_mask = (key_idx[None, :] <= q_idx[:, None]) & (
                        key_idx[None, :] > q_idx[:, None] - w
                    )
                    glob = masked_attention(q, new.k0[li], new.v0[li], global_mask)
                    loc = masked_attention(q, keys_k, keys_v, local_mask.expand(b, t, r + t))
                    a = self._mix(li, q, glob, loc)
                    new.local_k[loop - 1][li] = keys_k[:, :, -w:]
                    new.local_v[loop - 1][li] = keys_v[:, :, -w:]
                h = self._layer_tail(layer, h, a)
        return self._logits(h), new

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, LoopCoderCache]:
        """input_ids [B, T] (no padding) -> logits [B, T, V] and the cache after T tokens."""
        return self.extend(input_ids, None)

    @torch.no_grad()
    def decode_step(
        self, token_ids: torch.Tensor, cache: LoopCoderCache
    ) -> tuple[torch.Tensor, LoopCoderCache]:
        """One token per row: token_ids [B, 1] -> logits [B, 1, V] and a new cache.

        No masks: the new token sees every loop-0 cache entry (global) and, per loop >= 1, the
        ring of that loop's last W K/V including its own (local).
        """
        b = token_ids.shape[0]
        pos = cache.length
        w = self.window
        positions = torch.full((b, 1), pos, dtype=torch.long)
        cos, sin = rope_cos_sin(positions, self.cfg["head_dim"], self.cfg["rope_theta"])
        new = LoopCoderCache(
            k0=list(cache.k0),
            v0=list(cache.v0),
            local_k=[list(x) for x in cache.local_k],
            local_v=[list(x) for x in cache.local_v],
            length=pos + 1,
        )
        h = self.model.embed_tokens(token_ids)
        for loop in range(self.loop_num):
            for li, layer in enumerate(self.model.layers):
                q, k, v = self._qkv(layer, h, cos, sin)
                if loop == 0:
                    new.k0[li] = torch.cat([cache.k0[li], k], dim=2)
                    new.v0[li] = torch.cat([cache.v0[li], v], dim=2)
                    a = _attend_all(q, new.k0[li], new.v0[li])
                else:
                    ring_k = torch.cat([cache.local_k[loop - 1][li], k], dim=2)[:, :, -w:]
                    ring_v = torch.cat([cache.local_v[loop - 1][li], v], dim=2)[:, :, -w:]
                    new.local_k[loop - 1][li], new.local_v[loop - 1][li] = ring_k, ring_v
                    glob = _attend_all(q, new.k0[li], new.v0[li])
                    loc = _attend_all(q, ring_k, ring_v)
                    a = self._mix(li, q, glob, loc)
                h = self._layer_tail(layer, h, a)
        return self._logits(h), new

    @torch.no_grad()
    def greedy_generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """input_ids [B, T] (equal lengths, no padding) -> new token ids [B, max_new_tokens]."""
        logits, cache = self.prefill(input_ids)
        out = []
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits, cache = self.decode_step(token, cache)
        if not out:
            return input_ids.new_zeros((input_ids.shape[0], 0))
        return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------
# A second, independent implementation: plain dense Llama from a state dict.


def llama_forward(
    state_dict: dict[str, torch.Tensor], hf_config: dict, input_ids: torch.Tensor
) -> torch.Tensor:
    """Dense Llama (no loops, no gates) computed in float32 from official tensor names.

    input_ids [B, T] -> logits [B, T, V] float32. Must equal TorchLoopCoder with loop_num = 1.
    """
    sd = {name: t.detach().float() for name, t in state_dict.items()}
    n_heads = hf_config["num_attention_heads"]
    n_kv = hf_config.get("num_key_value_heads", n_heads)
    hd = hf_config.get("head_dim", hf_config["hidden_size"] // n_heads)
    eps = hf_config.get("rms_norm_eps", 1e-5)
    theta = hf_config.get("rope_theta", 500000.0)
    bsz, t = input_ids.shape

    def norm(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    half = hd // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32) * 2.0 / hd)  # [H/2]
    ang = torch.arange(t, dtype=torch.float32)[:, None] * freqs[None, :]  # [T, H/2]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # [..., T, H]: rotate the pair (x[i], x[i + H/2]) by the angle of frequency i
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    h = sd["model.embed_tokens.weight"][input_ids]
    for i in range(hf_config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).reshape(bsz, t, n_heads, hd)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).reshape(bsz, t, n_kv, hd)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).reshape(bsz, t, n_kv, hd)
        # [B, K, G, T, H]: query heads grouped under the kv head they share.
        q = rope(q.permute(0, 2, 1, 3)).reshape(bsz, n_kv, n_heads // n_kv, t, hd)
        k = rope(k.permute(0, 2, 1, 3))[:, :, None]
        v = v.permute(0, 2, 1, 3)[:, :, None]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
        o = (att @ v).reshape(bsz, n_heads, t, hd).permute(0, 2, 1, 3).reshape(bsz, t, -1)
        h = h + o @ sd[p + "self_attn.o_proj.weight"].T
        y = norm(h, sd[p + "post_attention_layernorm.weight"])
        gate = y @ sd[p + "mlp.gate_proj.weight"].T
        up = y @ sd[p + "mlp.up_proj.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    h = norm(h, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return h @ head.T


# ---------------------------------------------------------------------------------------------
# HF-layout checkpoint writer.


def save_hf_checkpoint_torch(
    model: nn.Module,
    hf_config: dict,
    out_dir: str | os.PathLike,
    num_shards: int = 1,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Writes config.json and safetensors in the official HF layout; returns the weight file names.

    num_shards == 1: model.safetensors. Otherwise model-0000k-of-0000n.safetensors (contiguous runs
    of tensors in state_dict order, split by tensor count) plus model.safetensors.index.json.
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {
        name: t.detach().to(dtype).contiguous().clone() for name, t in model.state_dict().items()
    }
    names = list(tensors)
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards must be in [1, {len(names)}], got {num_shards}")

    config = dict(hf_config)
    config["architectures"] = ["IQuestLoopCoderForCausalLM"]
    config["model_type"] = "iquestloopcoder"
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)

    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if num_shards == 1:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]

    files, weight_map = [], {}
    base, extra = divmod(len(names), num_shards)
    start = 0
    for k in range(num_shards):
        stop = start + base + (1 if k < extra else 0)
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {name: tensors[name] for name in names[start:stop]}
        save_file(shard, os.path.join(out_dir, fname), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, fname))
        files.append(fname)
        start = stop
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return files
