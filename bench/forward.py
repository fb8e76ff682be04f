"""Forward throughput of the JAX LoopCoder against the torch reference, same config, one run.

  python bench/forward.py [--batch 4 --seq 512 --repeats 10]

Prints one JSON line per measurement: tokens/s of the jitted JAX forward and of the torch
reference (eager, no_grad) on identical weights, their ratio, and the FLOP check (XLA's
compiled count of a T=4096, W=64 forward vs the analytic count that charges the local branch
W keys per query). Both frameworks use every core they see; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loopcoder_jax import LoopCoder, ModelConfig, RuntimeConfig, flops  # noqa: E402
from loopcoder_jax.checkpoint import abstract_params  # noqa: E402
from loopcoder_jax.convert import hf_to_params  # noqa: E402

BENCH_CONFIG = ModelConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=8192,
    rope_theta=10000.0,
    loop_num=2,
    loop_window_size=64,
    eos_token_id=(2,),
    torch_dtype="float32",
)


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_throughput(cfg: ModelConfig, batch: int, seq: int, repeats: int) -> dict:
    import torch

    from tests.reference.torch_loopcoder import TorchLoopCoder

    ref = TorchLoopCoder(cfg.to_hf()).init_random_(0, gate_scale=0.5).eval()
    params = jax.tree.map(
        jnp.asarray, hf_to_params(cfg, {k: v.numpy() for k, v in ref.state_dict().items()})
    )
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
    forward = jax.jit(lambda p, i: LoopCoder(cfg).apply({"params": p}, i))
    ids_jax = jnp.asarray(ids)
    jax_s = median_seconds(lambda: forward(params, ids_jax).block_until_ready(), repeats)
    ids_torch = torch.as_tensor(ids).long()

    def torch_forward():
        with torch.no_grad():
            ref(ids_torch)

    torch_s = median_seconds(torch_forward, repeats)
    # Same weights, same input: the two must agree, or the timing compares different work.
    with torch.no_grad():
        diff = float(np.abs(np.asarray(forward(params, ids_jax)) - ref(ids_torch).numpy()).max())
    tokens = batch * seq
    return {
        "bench": "forward",
        "batch": batch,
        "seq": seq,
        "jax_tokens_per_s": round(tokens / jax_s, 1),
        "torch_tokens_per_s": round(tokens / torch_s, 1),
        "jax_over_torch": round(torch_s / jax_s, 2),
        "max_abs_logit_diff": diff,
        "torch_threads": torch.get_num_threads(),
    }


def bench_flop_count(cfg: ModelConfig, seq: int = 4096) -> dict:
    runtime = RuntimeConfig(scan_layers=False)  # cost_analysis counts a scan body once
    cfg = cfg.replace(max_position_embeddings=max(seq, cfg.max_position_embeddings))
    compiled = (
        jax.jit(lambda p, i: LoopCoder(cfg, runtime).apply({"params": p}, i))
        .lower(abstract_params(cfg, runtime), jax.ShapeDtypeStruct((1, seq), jnp.int32))
        .compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = flops.forward_flops(cfg, 1, seq, causal_dense=True)
    return {
        "bench": "forward_flops",
        "seq": seq,
        "window": cfg.loop_window_size,
        "xla_flops": cost["flops"],
        "analytic_flops": analytic,
        "xla_over_analytic": round(cost["flops"] / analytic, 4),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    common = {
        "device": jax.devices()[0].device_kind,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "git": git_sha(),
        "config": "hidden 256, 4 layers, 8/2 heads, head_dim 32, loop_num 2, W 64",
    }
    for seq in args.seq:
        result = bench_throughput(BENCH_CONFIG, args.batch, seq, args.repeats)
        print(json.dumps({**common, **result}))
    print(json.dumps({**common, **bench_flop_count(BENCH_CONFIG)}))


if __name__ == "__main__":
    main()
