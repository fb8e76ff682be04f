"""Data-pipeline throughput on the shipped corpus: batches/s and tokens/s of packed batches.

    python bench/bench_data.py [--batch-size 8] [--seq-len 256] [--steps 200] [--repeats 5]

Warms up (startup + first batches), then times `repeats` windows of `steps` batches and prints
one JSON line with the median. The embedded default needs ~1-10 batches/s; anything far above
means the pipeline is not the bottleneck.
"""

import argparse
import json
import statistics
import subprocess
import time

from loopcoder_jax.config import DataConfig
from loopcoder_jax.data import pipeline
from loopcoder_jax.data.tokenizer import load_tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker-count", type=int, default=0)
    parser.add_argument("--fim-rate", type=float, default=0.0)
    args = parser.parse_args()
    tok = load_tokenizer()
    cfg = DataConfig(worker_count=args.worker_count, fim_rate=args.fim_rate)
    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(
        cfg, tokenizer=tok, seq_len=args.seq_len, batch_size=args.batch_size
    )
    next(it)
    startup_s = time.perf_counter() - t0
    for _ in range(20):
        next(it)
    rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.steps):
            batch = next(it)
        rates.append(args.steps / (time.perf_counter() - t))
    it.close()
    bps = statistics.median(rates)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(
        json.dumps(
            {
                "bench": "data_pipeline",
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "worker_count": args.worker_count,
                "fim_rate": args.fim_rate,
                "startup_s": round(startup_s, 3),
                "batches_per_s": round(bps, 1),
                "tokens_per_s": round(bps * args.batch_size * args.seq_len),
                "real_token_fraction": pipeline.describe_batch(batch)["real_fraction"],
                "git": sha.stdout.strip(),
            }
        )
    )


if __name__ == "__main__":
    main()
