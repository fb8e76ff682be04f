"""Run-dir hygiene: one writer per run dir, strict-JSON metrics, honest end-of-run lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from loopcoder_jax import runlock
from loopcoder_jax.trainer import MetricsLog, RunSummary


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no process has this id (until the kernel reuses it)


def test_second_writer_is_refused_naming_host_and_pid(tmp_path):
    with runlock.RunDirLock(tmp_path):
        with pytest.raises(runlock.RunDirLockedError) as e:
            runlock.RunDirLock(tmp_path).acquire()
    msg = str(e.value)
    assert f"pid {os.getpid()} on this host" in msg and "--run-dir" in msg
    assert not (tmp_path / runlock.LOCK_FILE).exists()  # released


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path):
    dead = {"host": socket.gethostname(), "pid": _dead_pid(), "started": 0.0}
    (tmp_path / runlock.LOCK_FILE).write_text(json.dumps(dead))
    notes = []
    with runlock.RunDirLock(tmp_path, log=notes.append):
        held = json.loads((tmp_path / runlock.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {dead['pid']}" in notes[0] and "dead" in notes[0]


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    other = {"host": "some-other-host", "pid": 1, "started": 0.0}
    (tmp_path / runlock.LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(runlock.RunDirLockedError, match="host some-other-host.*delete"):
        runlock.RunDirLock(tmp_path).acquire()


def test_a_garbled_lock_file_is_stale(tmp_path):
    (tmp_path / runlock.LOCK_FILE).write_text('{"host": "x", "pi')  # holder killed mid-write
    with runlock.RunDirLock(tmp_path, log=lambda _: None) as lock:
        assert lock.held


def test_metrics_jsonl_is_strict_json_with_null_for_nan(tmp_path):
    log = MetricsLog(str(tmp_path), resume_step=0, tensorboard=False)
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line

    def reject(token):
        raise ValueError(token)

    record = json.loads(line, parse_constant=reject)  # strict JSON parses
    assert record == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}


def _summary(first, last, total, **kw):
    return RunSummary("RUN", first, last, 1.0, 0.5, 100.0, "RUN/checkpoints/x", total_steps=total,
                      **kw)  # fmt: skip


def test_end_of_run_lines_say_what_happened():
    assert _summary(1, 30, 30).line().startswith("[train] done: steps 1..30")
    paused = _summary(1, 15, 30).line()
    assert paused.startswith("[train] paused at 15/30: steps 1..15") and "--stop-at" in paused
    assert "preempted: SIGTERM" in _summary(1, 7, 30, preempted=True).line()
    none = RunSummary("RUN", 211, 210, None, None, None, "RUN/checkpoints/210").line()
    assert none.startswith(
        "[train] already complete at step 210: raise --steps or use a new --run-dir"
    )
