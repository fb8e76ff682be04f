"""Generation from 2 real jax.distributed processes (127.0.0.1, gloo) == one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from loopcoder_jax.generate import INSTRUCT_SAMPLING, Engine

from .helpers import random_params, random_prompts, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_generate_the_same_tokens_as_one(tmp_path):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": REPO,
    }
    port = _free_port()
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.inference.multiprocess_worker",
                str(port),
                str(i),
                str(outs[i]),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=500)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    got = [json.loads(o.read_text()) for o in outs]
    assert got[0] == got[1]

    cfg = tiny_cfg(loop_num=2)
    engine, params = Engine(cfg), random_params(cfg, seed=0)
    prompts, eos = random_prompts([3, 9, 6], seed=11), [cfg.vocab_size - 1]
    assert got[0]["greedy"] == engine.generate(params, prompts, 40, eos_ids=eos).tokens
    sampled = engine.generate(
        params, prompts, 40, eos_ids=eos, sampling=INSTRUCT_SAMPLING, seed=[1, 2, 3]
    ).tokens
    assert got[0]["sampled"] == sampled
