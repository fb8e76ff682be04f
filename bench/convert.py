"""Conversion throughput and peak host memory on a synthetic multi-GB bf16 checkpoint.

Writes a random HF checkpoint (official names, 1 GB shards), then times
`python -m loopcoder_jax.convert hf-to-orbax` and `orbax-to-hf` as separate processes and reads
each one's peak RSS from `wait4` (so the numbers include Python, jax and Orbax themselves).
The round trip must reproduce the original shard files byte for byte. Prints one JSON line.

    python bench/convert.py                      # ~3.6 GB checkpoint (largest param 0.94 GB)
    python bench/convert.py --layers 4 --repeats 1   # quick smoke run

The source files are fresh in the page cache, so MB/s is the converter's own speed (parse,
transpose, Orbax encode/write), not the disk's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from loopcoder_jax import convert  # noqa: E402
from loopcoder_jax import safetensors_io as sio  # noqa: E402
from loopcoder_jax.config import ModelConfig  # noqa: E402


def synthetic_config(args) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
        head_dim=128,
        loop_num=2,
        torch_dtype="bfloat16",
    )


def write_synthetic(cfg: ModelConfig, path: str) -> int:
    """Random bf16 HF checkpoint, one tensor in memory at a time. Returns its weight bytes."""
    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = [(n, s, bf16) for n, s in convert.hf_tensor_order(cfg)]
    planned, headers = sio.plan_shards(specs, "1GB")
    os.makedirs(path)
    rng = np.random.default_rng(0)
    writer = sio.ShardWriter(path, planned, headers)
    for p in planned:
        # Random bits in the normal bf16 range (exponents 0x3C..0x3F: |x| in [2^-7, 2)).
        raw = rng.integers(0, 2**16, p.shape, dtype=np.uint16)
        raw = (raw & 0x81FF) | 0x3C00
        writer.write(p.name, raw.view(bf16))
    writer.finish()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    return sum(p.nbytes for p in planned)


def run_measured(cmd: list[str]) -> tuple[float, float, float]:
    """Runs `cmd` under /usr/bin/time; returns (wall s, CPU s, that process's peak RSS in MiB).

    (`wait4` from this process would over-report: a forked child's high-water mark starts at
    the parent's RSS, which here holds jax and the synthetic data.)
    """
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    fd, rss_file = tempfile.mkstemp(suffix=".rss")
    os.close(fd)
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%U %S %M", "-o", rss_file, *cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    secs = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
    with open(rss_file) as f:
        user, system, rss_kb = f.read().split()[-3:]
    os.remove(rss_file)
    return secs, float(user) + float(system), int(rss_kb) / 1024


def file_digests(path: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            h = hashlib.blake2b()
            with open(os.path.join(path, name), "rb") as f:
                while chunk := f.read(64 << 20):
                    h.update(chunk)
            out[name] = h.hexdigest()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--piece-mb", type=int, default=None, help="converter --piece-mb")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="/tmp/loopcoder-bench-convert")
    args = p.parse_args()

    cfg = synthetic_config(args)
    shutil.rmtree(args.dir, ignore_errors=True)
    src, ox, back = (os.path.join(args.dir, d) for d in ("hf", "orbax", "hf-back"))
    total = write_synthetic(cfg, src)
    largest = max(
        cfg.num_hidden_layers * int(np.prod(tr.flax_shape(cfg))) * 2
        for _, _, tr in convert.layer_rows(cfg)
    )
    largest = max(largest, cfg.vocab_size * cfg.hidden_size * 2)
    budget_mb = 1.3 * largest / 2**20 + 300

    base = [sys.executable, "-m", "loopcoder_jax.convert"]
    extra = ["--no-progress"] + (["--piece-mb", str(args.piece_mb)] if args.piece_mb else [])
    _, _, import_rss = run_measured([sys.executable, "-c", "import loopcoder_jax.convert, jax"])
    results = {"hf-to-orbax": [], "orbax-to-hf": []}
    for _ in range(args.repeats):
        shutil.rmtree(ox, ignore_errors=True)
        shutil.rmtree(back, ignore_errors=True)
        results["hf-to-orbax"].append(run_measured(base + ["hf-to-orbax", src, ox] + extra))
        results["orbax-to-hf"].append(
            run_measured(
                base
                + [
                    "orbax-to-hf",
                    ox,
                    back,
                    "--no-progress",
                    "--max-shard-size",
                    "1GB",
                ]
            )
        )
    identical = file_digests(src) == file_digests(back)
    line = {
        "bench": "convert",
        "device": "cpu",
        "git_sha": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "checkpoint_GB": round(total / 1e9, 3),
        "params_B": round(cfg.num_params() / 1e9, 3),
        "largest_stacked_param_MB": round(largest / 2**20, 1),
        "rss_budget_MB": round(budget_mb, 1),
        "import_only_rss_MB": round(import_rss, 1),
        "repeats": args.repeats,
        "round_trip_bit_identical_files": identical,
    }
    for name, runs in results.items():
        secs = statistics.median(s for s, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        peak = max(r for _, _, r in runs)
        line[name] = {
            "median_wall_s": round(secs, 2),
            "MB_per_s": round(total / 1e6 / secs, 1),
            "median_cpu_s": round(cpu, 2),
            "MB_per_cpu_s": round(total / 1e6 / cpu, 1),
            "peak_rss_MB": round(peak, 1),
            "within_budget": peak <= budget_mb,
        }
    shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
