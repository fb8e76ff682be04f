"""Analytic FLOP counts of the LoopCoder forward pass (both loops), for MFU and sanity checks.

Counted: every matmul as 2 * M * N * K (projections, MLP, gate, LM head) and the two attention
matmuls (q.k and p.v) per key a query looks at. Not counted: elementwise work (norms, RoPE,
softmax, SiLU), which is a few percent at most.

Keys per query:
  * global branch and loop 0 (causal): `causal_dense=True` charges all T keys, which is what
    the dense XLA path computes (masking does not save work); False charges (T + 1) / 2, what
    a block-skipping kernel (splash) does.
  * local branch of loops >= 1: W keys per query (the blockwise XLA path computes 2W; a
    kernel that skips masked blocks approaches W).
Training = 3 x forward (backward ~ 2 x forward), plus the remat recompute if any.
"""

from __future__ import annotations

from loopcoder_jax.config import ModelConfig


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    """Matmul FLOPs per token of ONE application of ONE layer (attention excluded)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return 2 * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f)


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int, *, causal_dense: bool = True) -> int:
    """FLOPs of one forward pass over [batch, seq_len] tokens, all loops, LM head included."""
    t, n, h, w = seq_len, cfg.num_attention_heads, cfg.head_dim, cfg.loop_window_size
    causal_keys = t if causal_dense else (t + 1) / 2
    local_keys = min(w, t)
    per_layer = 0.0
    for loop_idx in range(cfg.loop_num):
        per_layer += t * matmul_flops_per_token(cfg)
        per_layer += 4 * t * causal_keys * n * h  # loop 0 / global branch
        if loop_idx > 0:
            per_layer += 4 * t * local_keys * n * h  # local branch
            if cfg.gate_type == "query":
                per_layer += 2 * t * n * h
            elif cfg.gate_type == "hidden":
                per_layer += 2 * t * cfg.hidden_size * n
    head = 2 * t * cfg.hidden_size * cfg.vocab_size
    return int(batch * (cfg.num_hidden_layers * per_layer + head))


def train_flops(cfg: ModelConfig, batch: int, seq_len: int, *, causal_dense: bool = True) -> int:
    """FLOPs of one training step (forward + backward = 3 x forward), no remat recompute."""
    return 3 * forward_flops(cfg, batch, seq_len, causal_dense=causal_dense)


# Dense bf16 peak FLOP/s per chip (vendor datasheets), for MFU. Keys are matched as
# substrings of `jax.Device.device_kind`, most specific first (v5e reports "TPU v5 lite",
# v5p "TPU v5").
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
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
