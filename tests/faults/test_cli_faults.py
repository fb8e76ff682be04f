"""train.py under faults, as a user meets them: exit codes, messages, what is left on disk.

Fast cases (refused before anything compiles) run in CI; the ones that train are `slow`.
Subprocesses share a persistent compilation cache (as in tests/training/test_train_cli.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from tests.faults._small_fs import small_filesystem
from tests.training.test_train_cli import REPO, _env, _metrics, _train_cmd, _wait_for_step


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _train(run, cache_dir, *extra, timeout=600):
    return subprocess.run(
        _train_cmd(run, *extra), cwd=REPO, env=_env(cache_dir), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _refused(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for needle in needles:
        assert needle in p.stderr, p.stderr[-3000:]


# ---------------------------------------------------------------------------- CI (no training)
@pytest.mark.parametrize("value", ["inf", ".nan", "-.inf", "1e400"])
def test_non_finite_train_floats_are_config_errors(value):
    from loopcoder_jax.config import ConfigError, ExperimentConfig

    for key in ("train.lr", "train.clip_grad_norm", "train.eps"):
        with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
            ExperimentConfig.from_yaml(None, {key: value})


def test_non_finite_lr_is_refused_by_the_cli(tmp_path, cache_dir):
    p = _train(tmp_path / "run", cache_dir, "--set", "train.lr=inf")
    _refused(p, "train.lr must be a finite number")
    assert not os.path.exists(tmp_path / "run")


def test_run_dir_in_use_is_refused_naming_the_holder(tmp_path, cache_dir):
    """A live holder (this test process) on the same host: train.py refuses, touches nothing."""
    run = tmp_path / "run"
    run.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    (run / ".lock").write_text(json.dumps(holder))
    p = _train(run, cache_dir, "--steps", "2")
    _refused(p, f"in use by another training process (pid {os.getpid()} on this host")
    assert sorted(os.listdir(run)) == [".lock"]


def test_failed_start_leaves_no_run_dir(tmp_path, cache_dir):
    p = _train(tmp_path / "run", cache_dir, "--set", f"data.sources=[{tmp_path}/nope-*.jsonl]")
    assert p.returncode == 2 and "nope-" in p.stderr, p.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run")


def _tensorboard_steps(logdir, tag) -> list[int]:
    """Steps of `tag` in the event files (TFRecord framing: u64 length, u32 crc, data, u32
    crc), parsed with tensorboardX's own protobufs."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = Event.FromString(f.read(length))
                f.read(4)
                steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


# ---------------------------------------------------------------------------- slow (training)
CKPT = ["--set", "train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache_dir):
    """8 steps, checkpoints at 4 and 8."""
    run = tmp_path_factory.mktemp("base") / "run"
    p = _train(run, cache_dir, "--steps", "8", *CKPT)
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def _copy(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    return run


def _largest_file(step_dir) -> str:
    files = [os.path.join(d, n) for d, _, ns in os.walk(step_dir) for n in ns]
    return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_rerunning_a_finished_run_says_it_is_complete(base_run, tmp_path, cache_dir):
    p = _train(_copy(base_run, tmp_path), cache_dir, "--steps", "8", *CKPT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[train] already complete at step 8: raise --steps or use a new --run-dir" in p.stdout


@pytest.mark.slow
def test_stop_at_says_paused(base_run, tmp_path, cache_dir):
    p = _train(_copy(base_run, tmp_path), cache_dir, "--steps", "12", "--stop-at", "10", *CKPT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[train] paused at 10/12: steps 9..10" in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip_4000_bytes"])
def test_damaged_newest_checkpoint_resumes_exactly_from_the_older_one(
    base_run, tmp_path, cache_dir, damage
):
    run = _copy(base_run, tmp_path)
    victim = _largest_file(run / "checkpoints" / "8")
    if damage == "truncate":
        os.truncate(victim, os.path.getsize(victim) // 2)
    else:
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            chunk = bytearray(f.read(4000))
            f.seek(os.path.getsize(victim) // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
    p = _train(run, cache_dir, "--steps", "8", *CKPT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"skipped checkpoint {run}/checkpoints/8" in p.stdout
    assert f"resumed from {run}/checkpoints/4" in p.stdout
    # steps 5..8 re-run from checkpoint 4 give the same losses, bitwise
    np.testing.assert_array_equal(
        [r["loss"] for r in _metrics(run)], [r["loss"] for r in _metrics(base_run)]
    )


@pytest.mark.slow
def test_no_checkpoint_verifies_exits_2_naming_each_step(base_run, tmp_path, cache_dir):
    run = _copy(base_run, tmp_path)
    for step in (4, 8):
        victim = _largest_file(run / "checkpoints" / str(step))
        os.truncate(victim, os.path.getsize(victim) // 2)
    p = _train(run, cache_dir, "--steps", "12", *CKPT)
    _refused(p, "No checkpoint in", "step 8: unreadable", "step 4: unreadable")
    assert sorted(os.listdir(run / "checkpoints")) == ["4", "8"]  # nothing deleted


@pytest.mark.slow
def test_kill9_keeps_tensorboard_steps_and_a_stale_lock_is_taken_over(tmp_path, cache_dir):
    run = tmp_path / "run"
    cmd = _train_cmd(run, "--steps", "12", *CKPT)
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(cache_dir), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)  # fmt: skip
    _wait_for_step(p, run, 6)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    logged = [r["step"] for r in _metrics(run)]
    tb = _tensorboard_steps(run / "tensorboard", "train/loss")
    # every logged step reached TensorBoard (it is written first; one more may be there)
    assert tb[: len(logged)] == logged and len(tb) <= len(logged) + 1, (tb, logged)
    assert (run / ".lock").exists()  # left by the killed process
    q = _train(run, cache_dir, "--steps", "12", *CKPT)
    assert q.returncode == 0, q.stderr[-3000:]
    assert "took over the lock of a dead process" in q.stdout
    assert [r["step"] for r in _metrics(run)] == list(range(1, 13))


@pytest.mark.slow
def test_two_writers_on_one_run_dir(tmp_path, cache_dir):
    """Issue 10.3: the second writer is refused; the first one's metrics are all there."""
    run = tmp_path / "run"
    cmd = _train_cmd(run, "--steps", "5000", *CKPT)  # long enough to still run at the end
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(cache_dir), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_step(first, run, 1)
    second = _train(run, cache_dir, "--steps", "5000", *CKPT)
    _refused(second, f"pid {first.pid} on this host")
    assert first.poll() is None, "the first run must still be running for this test to mean it"
    first.send_signal(signal.SIGTERM)  # preemption: checkpoint and exit 0
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > 1


@pytest.mark.slow
def test_disk_full_while_saving_exits_2_at_once(tmp_path, cache_dir):
    with small_filesystem(tmp_path / "fs", 4 * 2**20) as (root, kind):
        run = os.path.join(root, "run")
        p = _train(run, cache_dir, "--steps", "12", *CKPT)
        assert p.returncode == 2, p.stderr[-3000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: Saving a checkpoint in {run}/checkpoints/4 failed"), last
        if kind == "tmpfs":
            assert "disk is full" in last
        assert os.listdir(os.path.join(run, "checkpoints")) == []  # no partial step left
        steps = [r["step"] for r in _metrics(run)]
        assert steps and steps[-1] < 12  # it stopped instead of training on without saving
