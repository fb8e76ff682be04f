"""Chunked vs one-shot prefill memory: XLA's compiled temporaries (nothing runs).

For a prompt of `--prompt` tokens, compiles (CPU, float32, batch 1):
  one-shot: `LoopCoder.prefill` over the whole prompt (the static engine's prefill);
  chunked: one `LoopCoder.prefill_chunk` call of `--chunk` tokens into a cache of the same
    length (what the serving engine runs prompt-length / C times);
and prints the compiler's temporary-buffer bytes (`memory_analysis().temp_size_in_bytes`, an
estimate of activation memory; the chunked cache is an argument, donated as the engine does)
as one JSON line.

    python bench/prefill_memory.py [--prompt 16384] [--chunk 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from loopcoder_jax.cache import init_cache  # noqa: E402
from loopcoder_jax.checkpoint import abstract_params  # noqa: E402
from loopcoder_jax.config import ModelConfig, RuntimeConfig  # noqa: E402
from loopcoder_jax.model import LoopCoder  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    cfg = ModelConfig(
        vocab_size=512, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
        head_dim=args.hidden // 8, max_position_embeddings=args.prompt, rope_theta=10000.0,
        loop_num=2, loop_window_size=64, eos_token_id=(2,), torch_dtype="float32",
    )  # fmt: skip
    runtime = RuntimeConfig(attn_impl="xla")
    model = LoopCoder(cfg, runtime)
    params = abstract_params(cfg, runtime)
    s = args.prompt

    def oneshot(params, ids):
        return model.apply({"params": params}, ids, max_length=s, method=LoopCoder.prefill)

    def chunked(params, ids, cache):
        return model.apply({"params": params}, ids, cache, method=LoopCoder.prefill_chunk)

    ids_full = jax.ShapeDtypeStruct((1, s), jnp.int32)
    ids_chunk = jax.ShapeDtypeStruct((1, args.chunk), jnp.int32)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, s))
    out = {}
    for name, fn, a, donate in (
        ("oneshot", oneshot, (params, ids_full), ()),
        ("chunked", chunked, (params, ids_chunk, cache), (2,)),  # the engine donates its cache
    ):
        mem = jax.jit(fn, donate_argnums=donate).lower(*a).compile().memory_analysis()
        out[f"{name}_temp_mib"] = round(mem.temp_size_in_bytes / 2**20, 1)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
    out.update(
        bench="prefill_memory", prompt=s, chunk=args.chunk, hidden=args.hidden,
        layers=args.layers, ratio=round(out["oneshot_temp_mib"] / out["chunked_temp_mib"], 1),
        git=os.environ.get("BENCH_GIT_SHA") or sha.stdout.decode().strip(),
        device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"),
    )  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
