"""Decode benchmark: the JAX engine vs the torch reference generating with its cache.

Same config (`--preset`, default `tiny`), same random weights (torch init, converted), same CPU,
one process. Measures, for batch 1 and batch 8:
  prefill tok/s: prompt tokens / prefill time (JAX: the compiled prefill, compile excluded);
  decode tok/s: new tokens / decode time (JAX: the on-device while_loop; torch: a Python loop
    of `decode_step` + argmax, as in `greedy_generate`), greedy, no early stop;
and the KV cache bytes against a dense model of equal depth (`cache_bytes`, loop_num=1).
Warm-up run first, then the median of `--repeats`. Prints one JSON line.

    python bench/decode.py [--preset tiny] [--prompt-len 64] [--new-tokens 128] [--repeats 3]
                           [--unroll-layers]
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

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from loopcoder_jax.cache import cache_bytes  # noqa: E402
from loopcoder_jax.config import RuntimeConfig, preset  # noqa: E402
from loopcoder_jax.convert import hf_to_params  # noqa: E402
from loopcoder_jax.generate import Engine  # noqa: E402
from tests.reference.torch_loopcoder import TorchLoopCoder  # noqa: E402


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
        return out.stdout.decode().strip() or "unknown"
    except OSError:
        return "unknown"


def jax_run(engine, params, prompts, new, eos):
    out = engine.generate(params, prompts, new, eos_ids=[eos])
    assert all(len(t) == new for t in out.tokens), "a row stopped early; pick another eos id"
    s = out.stats
    return s["prompt_tokens"] / s["prefill_s"], s["new_tokens"] / s["decode_s"], out.tokens


@torch.no_grad()
def torch_run(model, prompts, new):
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    logits, cache = model.prefill(ids)
    t1 = time.perf_counter()
    token = logits[:, -1].argmax(-1, keepdim=True)
    out = [token]
    for _ in range(new - 1):
        logits, cache = model.decode_step(token, cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    t2 = time.perf_counter()
    n_prompt, n_new = ids.numel(), ids.shape[0] * new
    return n_prompt / (t1 - t0), n_new / (t2 - t1), torch.cat(out, 1).tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument(
        "--unroll-layers",
        action="store_true",
        help="JAX engine with RuntimeConfig(scan_layers=False) (infer.py --unroll-layers)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)

    cfg = preset(args.preset)
    ref = TorchLoopCoder(cfg.to_hf()).init_random_(seed=0, gate_scale=0.5, std=0.05).eval()
    params = hf_to_params(cfg, {k: v.numpy() for k, v in ref.state_dict().items()})
    runtime = RuntimeConfig(scan_layers=not args.unroll_layers)
    engine = Engine(cfg, runtime, length_bucket=args.prompt_len)
    params = engine.shard_params(params)
    rng = np.random.default_rng(0)
    result = dict(
        bench="decode",
        preset=args.preset,
        device=jax.devices()[0].device_kind,
        machine="2-core CPU dev box, no accelerator" if os.cpu_count() == 2 else "",
        git_sha=git_sha(),
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        torch_threads=args.torch_threads,
        jax_layers="unrolled" if args.unroll_layers else "scan",
        repeats=args.repeats,
    )
    for b in (int(x) for x in args.batches.split(",")):
        prompts = rng.integers(3, cfg.vocab_size, size=(b, args.prompt_len)).tolist()
        for row in prompts:
            row[0] = cfg.bos_token_id
        # A stop id that no row generates, so every row decodes exactly new_tokens.
        first = engine.generate(params, prompts, args.new_tokens, eos_ids=[0]).tokens  # warm-up
        used = {t for row in first for t in row}
        eos = next(i for i in range(cfg.vocab_size) if i not in used)
        jx = [jax_run(engine, params, prompts, args.new_tokens, eos) for _ in range(args.repeats)]
        torch_run(ref, prompts, 4)  # warm-up
        th = [torch_run(ref, prompts, args.new_tokens) for _ in range(args.repeats)]
        same = jx[0][2] == th[0][2]
        med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
        result[f"b{b}"] = dict(
            jax_prefill_tok_s=round(med(jx, 0), 1),
            torch_prefill_tok_s=round(med(th, 0), 1),
            prefill_ratio=round(med(jx, 0) / med(th, 0), 2),
            jax_decode_tok_s=round(med(jx, 1), 1),
            torch_decode_tok_s=round(med(th, 1), 1),
            decode_ratio=round(med(jx, 1) / med(th, 1), 2),
            greedy_tokens_equal=same,
        )
    s = args.prompt_len + args.new_tokens
    dense = cfg.replace(loop_num=1)
    result["cache_bytes_b1_f32"] = dict(
        loop=cache_bytes(cfg, 1, s, np.float32),
        dense_equal_depth=cache_bytes(dense, 1, s, np.float32),
        ratio=round(cache_bytes(cfg, 1, s, np.float32) / cache_bytes(dense, 1, s, np.float32), 4),
    )
    big, big_dense = preset("loop40b"), preset("dense40b")
    result["cache_bytes_loop40b_b1_32k_bf16"] = dict(
        loop=cache_bytes(big, 1, 32768),
        dense_equal_depth=cache_bytes(big_dense, 1, 32768),
        ratio=round(cache_bytes(big, 1, 32768) / cache_bytes(big_dense, 1, 32768), 5),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
