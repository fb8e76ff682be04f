"""Real multi-process training: 2 processes x 2 CPU devices on 127.0.0.1 (gloo collectives).

The 2-process run trains, checkpoints, is restarted and resumes; its losses equal those of a
1-process 4-device run of the same config. `train.data_shards=2` makes the global batches
identical whatever the process count (see trainer.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = [
    "--no-progress",
    "--set", "train.batch_size=8",
    "--set", "train.seq_len=32",
    "--set", "train.warmup_steps=2",
    "--set", "train.checkpoint_every=2",
    "--set", "train.data_shards=2",
    "--set", "data.startup_check_records=50",
    "--set", "mesh.fsdp=2",
    "--set", "mesh.tensor=2",
]  # fmt: skip


def _env(devices, cache):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(run_dir, cache, *extra):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                "--run-dir",
                str(run_dir),
                "--steps",
                "6",
                *ARGS,
                *extra,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            cwd=REPO,
            env=_env(2, cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=400)
            outs.append((p.returncode, out.decode(), err.decode()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    return outs


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path):
    cache = tmp_path / "cache"
    multi = tmp_path / "multi"
    outs = _two_processes(multi, cache, "--stop-at", "4")
    assert "2 process(es)" in outs[0][1] and "mesh {'data': 1, 'fsdp': 2, 'tensor': 2" in outs[0][1]
    assert "[train]" not in outs[1][1]  # only process 0 reports
    assert "[train] paused at 4/6" in outs[0][1]
    assert not (multi / ".lock").exists()  # process 0 held the run-dir lock and released it
    assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
    # both processes saved their data-iterator state
    data_dir = multi / "checkpoints" / "4" / "data"
    assert sorted(n for n in os.listdir(data_dir) if n.startswith("process_")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    outs = _two_processes(multi, cache)  # restart: resumes at step 4
    assert "resumed from" in outs[0][1]

    single = tmp_path / "single"
    p = subprocess.run(
        [sys.executable, "train.py", "--run-dir", str(single), "--steps", "6", *ARGS],
        cwd=REPO, env=_env(4, cache), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    steps_m, loss_m = _losses(multi)
    steps_s, loss_s = _losses(single)
    assert steps_m == steps_s == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(loss_m, loss_s, atol=1e-5, rtol=0)
    assert loss_m[-1] < loss_m[0]
