"""Peak host memory of `orbax-to-hf` from a training run directory (one Orbax tree per step).

Writes a random bf16 run dir (config.json + checkpoints/1/params, as train.py saves params),
then runs `python -m loopcoder_jax.convert orbax-to-hf RUN OUT` as a child process and reads its
peak RSS from `wait4`. `--code DIR` runs another checkout's converter (e.g. the code before
streaming) for comparison. Prints one JSON line.

    python bench/convert_run_dir.py --layers 16 --hidden 2048 --intermediate 8192
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from loopcoder_jax import checkpoint as ckpt  # noqa: E402
from loopcoder_jax.config import ModelConfig  # noqa: E402


def write_run_dir(cfg: ModelConfig, path: str) -> int:
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shapes = ckpt.abstract_params(cfg)
    import jax

    params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32).astype(bf16), shapes)
    os.makedirs(path)
    ckpt.write_json_atomic(os.path.join(path, "config.json"), cfg.to_hf())
    saver = ocp.StandardCheckpointer()
    saver.save(os.path.join(path, "checkpoints", "1", "params"), params)
    saver.wait_until_finished()
    leaves = jax.tree.leaves(params)
    return sum(x.nbytes for x in leaves), max(x.nbytes for x in leaves)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--code", default=REPO, help="checkout whose converter to run")
    p.add_argument("--write-to", help=argparse.SUPPRESS)  # internal: the writer child process
    args = p.parse_args()
    cfg = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512), head_dim=128, loop_num=2,
        torch_dtype="bfloat16",
    )  # fmt: skip
    if args.write_to:
        print(json.dumps(write_run_dir(cfg, args.write_to)))
        return
    tmp = tempfile.mkdtemp(prefix="convert_run_dir-")
    try:
        run = os.path.join(tmp, "run")
        # Written by a child process: ru_maxrss survives fork + exec, so the converter's child
        # would otherwise report this process's peak (the whole random model) as its own.
        writer = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--write-to", run],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        total, largest = json.loads(writer.stdout.strip().splitlines()[-1])
        env = dict(os.environ, PYTHONPATH=args.code, JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-m", "loopcoder_jax.convert", "orbax-to-hf", run,
               os.path.join(tmp, "hf"), "--no-progress"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )  # cwd: `-m` imports from the current directory first
        _, status, usage = os.wait4(proc.pid, 0)
        secs = time.perf_counter() - start
        out = proc.stdout.read().decode().strip().splitlines()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(proc.stderr.read().decode()[-2000:])
        print(json.dumps({
            "bench": "convert_run_dir", "model_bytes": total, "largest_leaf_bytes": largest,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(secs, 1),
            "code": os.path.abspath(args.code), "summary": json.loads(out[-1]) if out else None,
        }))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
