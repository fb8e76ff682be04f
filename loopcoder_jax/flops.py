"""Analytic FLOP counts of the LoopCoder forward pass and of a training step, and device peaks.

What `forward_flops` counts (one multiply-add = 2 FLOPs, matmuls and attention only):
  * per layer, per loop, per token: the q/k/v/o projections `2 * D * (2N + 2K) * H` and the
    SwiGLU MLP `2 * 3 * D * F`; every loop runs the whole shared stack, so these are paid
    `loop_num` times;
  * the gate in loops >= 1: `2 * N * H` per token (q . W_g);
  * attention scores and the weighted sum, `2 * 2 * N * H` per (query, key) pair:
      - global (loop 0, and the global branch of every later loop): causal, T(T+1)/2 pairs
        per sequence, or T^2 with `causal_dense=True` (what a dense masked kernel executes);
      - local (loops >= 1): min(i + 1, W) keys for query i (`causal_dense=True`: W per
        query, a lower bound on what the blockwise XLA kernel executes);
  * the LM head: `2 * D * V` per token.
Not counted: norms, RoPE, softmax, residual adds, the embedding lookup, the loss (all
O(T * D) or O(T * V) elementwise work).

`train_flops` = 3 x forward (backward = 2 x forward), the usual "model FLOPs" convention:
rematerialised recomputation is NOT counted, so MFU does not reward remat.
"""

from __future__ import annotations

from loopcoder_jax.config import ModelConfig


def _attention_pairs(seq_len: int, window: int | None, causal_dense: bool) -> int:
    """(query, key) pairs per sequence for causal attention, optionally windowed."""
    t = seq_len
    if window is None:
        return t * t if causal_dense else t * (t + 1) // 2
    if causal_dense:
        return t * window
    w = min(window, t)
    # queries 0..w-1 see i+1 keys, the rest see w keys
    return w * (w + 1) // 2 + (t - w) * w


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    """Weight-matmul FLOPs per token of one forward pass (all loops, the LM head)."""
    d, f, n, k, h = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    per_layer = 2 * d * (2 * n + 2 * k) * h + 2 * 3 * d * f
    stack = cfg.num_hidden_layers * per_layer * cfg.loop_num
    gate = cfg.num_hidden_layers * 2 * n * h * (cfg.loop_num - 1)
    return stack + gate + 2 * d * cfg.vocab_size


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int, causal_dense: bool = False) -> int:
    """FLOPs of one full-sequence forward pass over [batch, seq_len] (see module docstring)."""
    tokens = batch * seq_len
    per_pair = 2 * 2 * cfg.num_attention_heads * cfg.head_dim
    global_pairs = _attention_pairs(seq_len, None, causal_dense)
    local_pairs = _attention_pairs(seq_len, cfg.loop_window_size, causal_dense)
    # loop 0: global only; each later loop: global over loop-0 K/V + local window
    pairs = global_pairs * cfg.loop_num + local_pairs * (cfg.loop_num - 1)
    attn = cfg.num_hidden_layers * batch * pairs * per_pair
    return tokens * matmul_flops_per_token(cfg) + attn


def train_flops(cfg: ModelConfig, batch: int, seq_len: int, causal_dense: bool = False) -> int:
    """Model FLOPs of one training step (forward + backward = 3 x forward, no remat)."""
    return 3 * forward_flops(cfg, batch, seq_len, causal_dense)


# Dense bf16 peak FLOP/s per chip (vendor datasheets). Keys are matched as substrings of
# `jax.Device.device_kind`, most specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM, dense bf16
    ("A100", 312e12),
)


def device_peak_flops(device_kind: str) -> float | None:
    """Peak FLOP/s of one device of this kind, or None when unknown (CPU: MFU is "n/a")."""
    for key, peak in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None
