"""One process of the 2-process generation test (run by test_multiprocess.py, not collected).

usage: python -m tests.inference.multiprocess_worker PORT PROCESS_ID OUT_JSON
Each process owns 4 CPU devices; the mesh spans all 8 (data 2 x fsdp 2 x tensor 2).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from loopcoder_jax.generate import INSTRUCT_SAMPLING, Engine

from .helpers import random_params, random_prompts, tiny_cfg


def main(port: str, process_id: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    cfg = tiny_cfg(loop_num=2)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    engine = Engine(cfg, mesh=mesh)
    params = engine.shard_params(random_params(cfg, seed=0))  # same values on both processes
    prompts = random_prompts([3, 9, 6], seed=11)
    eos = [cfg.vocab_size - 1]
    greedy = engine.generate(params, prompts, 40, eos_ids=eos).tokens
    sampled = engine.generate(
        params, prompts, 40, eos_ids=eos, sampling=INSTRUCT_SAMPLING, seed=[1, 2, 3]
    ).tokens
    with open(out, "w") as f:
        json.dump({"greedy": greedy, "sampled": sampled}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
