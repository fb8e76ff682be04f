"""Cost of the fault checks next to a train step, measured side by side in one process.

    python bench/bench_integrity.py [--preset tiny] [--devices 8] [--mesh data=4,fsdp=2]
        [--batch 8] [--seq 128] [--repeats 5]

Times (median of --repeats after one warm-up): one train step; `checkpoint_integrity.digest`
of params + optimizer state (what every save and every resume computes); the replica check
`integrity.check_replicas` (what `train.integrity_every` runs). Prints one JSON line with the
ratios to the step time. Fake CPU devices: XLA_FLAGS is set before jax is imported.
"""

import argparse
import json
import os
import statistics
import subprocess
import time


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--mesh", default="data=4,fsdp=2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import jax
    import numpy as np

    from loopcoder_jax import checkpoint_integrity, integrity
    from loopcoder_jax import sharding as sh
    from loopcoder_jax import training as tr
    from loopcoder_jax.config import MeshConfig, TrainConfig, preset
    from loopcoder_jax.model import LoopCoder

    mesh_cfg = MeshConfig(**{k: int(v) for k, v in (x.split("=") for x in args.mesh.split(","))})
    mesh = sh.make_mesh(mesh_cfg, jax.devices()[: args.devices])
    rules = sh.get_rules("fsdp_tp")
    tc = TrainConfig(batch_size=args.batch, seq_len=args.seq, steps=100)
    model, opt = LoopCoder(preset(args.preset)), tr.make_optimizer(tc)
    state = tr.make_init_fn(model, opt, mesh, rules)(jax.random.key(0))
    step_fn = tr.make_train_step(model, opt, mesh, rules, train_cfg=tc)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    ids = rng.integers(3, vocab, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": np.ones((args.batch, args.seq), np.int32),
        "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1)),
        "loss_mask": np.ones((args.batch, args.seq), np.float32),
    }
    batch = tr.shard_batch(batch, mesh, rules)
    items = lambda s: {"params": s.params, "opt_state": s.opt_state}  # noqa: E731

    def timed(fn):
        fn()  # warm-up (compiles)
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    holder = {"state": state}

    def one_step():
        holder["state"], m = step_fn(holder["state"], batch)
        jax.block_until_ready(m)

    step_s = timed(one_step)
    digest_s = timed(lambda: checkpoint_integrity.digest(items(holder["state"])))
    replicas_s = timed(lambda: integrity.check_replicas(items(holder["state"])))
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(
        json.dumps(
            {
                "bench": "integrity",
                "preset": args.preset,
                "device": jax.devices()[0].device_kind,
                "devices": args.devices,
                "mesh": dict(mesh.shape),
                "git": sha.stdout.strip(),
                "params": tr.count_params(state.params),
                "step_s": round(step_s, 4),
                "digest_s": round(digest_s, 4),
                "check_replicas_s": round(replicas_s, 4),
                "digest_per_step": round(digest_s / step_s, 3),
                "check_replicas_per_step": round(replicas_s / step_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
