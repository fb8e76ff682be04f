"""Tokens/s of the jitted JAX train step vs an equivalent eager PyTorch train step, same CPU.

Same model (preset, float32), same batch (one document per row), same loss (masked next-token
CE), AdamW with global-norm clipping on both sides. The torch side is the independent
reference model in tests/reference/torch_loopcoder.py (dense masked attention, as written
from DESIGN.md), run eagerly. Prints one JSON line.

    python bench/train_step.py [--preset tiny] [--batch 8] [--seq 128] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
        return out.stdout.decode().strip()
    except OSError:
        return "unknown"


def bench_jax(cfg, batch_np, steps, warmup):
    import jax

    from loopcoder_jax import sharding as sh
    from loopcoder_jax import training as tr
    from loopcoder_jax.config import MeshConfig, TrainConfig
    from loopcoder_jax.model import LoopCoder

    b, t = batch_np["input_ids"].shape
    tc = TrainConfig(batch_size=b, seq_len=t, steps=1000, warmup_steps=0, loss_chunk=t)
    model, opt = LoopCoder(cfg), tr.make_optimizer(tc)
    mesh = sh.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    rules = sh.get_rules("fsdp_tp")
    state = tr.make_init_fn(model, opt, mesh, rules)(jax.random.key(0))
    step = tr.make_train_step(model, opt, mesh, rules, train_cfg=tc)
    batch = tr.shard_batch(batch_np, mesh, rules)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s, float(m["loss"])


def bench_torch(cfg, batch_np, steps, warmup, threads):
    import torch
    import torch.nn.functional as F

    from tests.reference.torch_loopcoder import TorchLoopCoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TorchLoopCoder(cfg.to_hf())
    model.init_random_(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batch = {k: torch.from_numpy(v) for k, v in batch_np.items()}

    def step():
        logits = model(batch["input_ids"].long(), batch["segment_ids"], batch["positions"].long())
        ce = F.cross_entropy(
            logits.float().flatten(0, 1), batch["targets"].long().flatten(), reduction="none"
        )
        mask = batch["loss_mask"].flatten()
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), float(loss)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import jax
    import numpy as np

    from loopcoder_jax import flops
    from loopcoder_jax.config import preset

    cfg = preset(args.preset)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": np.ones((args.batch, args.seq), np.int32),
        "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1)),
        "loss_mask": np.ones((args.batch, args.seq), np.float32),
    }
    tokens = args.batch * args.seq
    jax_s, compile_s, jax_loss = bench_jax(cfg, batch, args.steps, args.warmup)
    torch_s, torch_loss = bench_torch(cfg, batch, args.steps, args.warmup, args.torch_threads)
    step_flops = flops.train_flops(cfg, args.batch, args.seq)
    print(
        json.dumps(
            {
                "bench": "train_step",
                "preset": args.preset,
                "batch": args.batch,
                "seq_len": args.seq,
                "device": jax.devices()[0].device_kind,
                "cpu_count": os.cpu_count(),
                "git_sha": _sha(),
                "jax_step_s": round(jax_s, 4),
                "jax_compile_s": round(compile_s, 2),
                "jax_tokens_per_s": round(tokens / jax_s, 1),
                "jax_gflops_per_s": round(step_flops / jax_s / 1e9, 2),
                "torch_step_s": round(torch_s, 4),
                "torch_tokens_per_s": round(tokens / torch_s, 1),
                "jax_over_torch": round(torch_s / jax_s, 3),
                "losses_after_run": [round(jax_loss, 4), round(torch_loss, 4)],
                "model_train_gflop_per_step": round(step_flops / 1e9, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
