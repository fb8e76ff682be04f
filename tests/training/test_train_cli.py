"""train.py end to end in subprocesses: loss drops, run dir, kill -9 / SIGTERM exact resume.

Each subprocess is a fresh single-device CPU JAX; they share a persistent compilation cache
(set in the subprocess environment, never in library code) so only the first one compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# small enough for CI, big enough to learn: tiny preset (vocab 512 = shipped tokenizer)
COMMON = [
    "--no-progress",
    "--set", "train.batch_size=8",
    "--set", "train.seq_len=64",
    "--set", "train.warmup_steps=4",
    "--set", "train.lr=5e-3",
    "--set", "data.startup_check_records=50",
    # 5% of the corpus held out, evaluated every 5 steps: resumes must reproduce it too
    "--set", "data.eval_fraction=0.05",
    "--set", "train.eval_every=5",
    "--set", "train.eval_batches=2",
]  # fmt: skip
STEPS = 20
EVAL_STEPS = [5, 10, 15, 20]


def _env(cache_dir, devices=1):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _train_cmd(run_dir, *extra):
    return [sys.executable, "train.py", "--run-dir", str(run_dir), *COMMON, *extra]


def _metrics(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _wait_for_step(proc, run_dir, step, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = _metrics(run_dir)
        if m and m[-1]["step"] >= step:
            return m[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("straight")
    p = subprocess.run(
        _train_cmd(run, "--steps", str(STEPS), "--set", "train.checkpoint_every=100"),
        cwd=REPO, env=_env(cache_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return run, p.stdout


def test_loss_drops_and_run_dir_is_complete(straight_run):
    run, stdout = straight_run
    m = _metrics(run)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in m]
    # a real drop: from ~ln(512) = 6.2 at init by more than 1 nat in 20 steps
    assert losses[0] > 5.5 and np.mean(losses[-3:]) < losses[0] - 1.0, losses
    for r in m:
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["grad_norm"] > 0
    assert "[train] done: steps 1..20" in stdout and "checkpoints/20" in stdout
    evals = [r for r in m if "eval_loss" in r]
    assert [r["step"] for r in evals] == EVAL_STEPS
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[0]["eval_tokens"] > 0
    assert all(r["eval_ppl"] == pytest.approx(np.exp(r["eval_loss"])) for r in evals)
    assert f"eval loss {evals[-1]['eval_loss']:.4f}" in stdout
    for name in ("config.json", "experiment.json", "tokenizer.model"):
        assert os.path.isfile(os.path.join(run, name)), name
    events = [n for n in os.listdir(run / "tensorboard") if n.startswith("events.out.tfevents")]
    assert events
    tb = b"".join((run / "tensorboard" / n).read_bytes() for n in events)
    assert b"train/loss" in tb and b"eval/loss" in tb and b"eval/ppl" in tb
    assert {"data", "meta", "opt_state", "params"} <= set(os.listdir(run / "checkpoints" / "20"))


def test_run_dir_loads_as_params_checkpoint_and_generates_finite_logits(straight_run):
    import jax.numpy as jnp

    from loopcoder_jax.checkpoint import load_params
    from loopcoder_jax.data.tokenizer import load_tokenizer
    from loopcoder_jax.model import LoopCoder

    run, _ = straight_run
    cfg, params = load_params(run)
    tok = load_tokenizer(run)  # the copy in the run dir
    ids = jnp.asarray([tok.encode("def add(a, b):\n    return")], jnp.int32)
    logits = LoopCoder(cfg).apply({"params": params}, ids)
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_sigterm_saves_and_kill9_resume_is_exact(straight_run, tmp_path, cache_dir):
    """SIGTERM -> checkpoint + exit 0; kill -9 -> resume from the last checkpoint; losses of
    the stitched run equal the straight run's bitwise."""
    ref = [r["loss"] for r in _metrics(straight_run[0])]
    run = tmp_path / "interrupted"
    cmd = _train_cmd(run, "--steps", str(STEPS), "--set", "train.checkpoint_every=4")
    env = _env(cache_dir)

    # 1) preemption notice at step >= 6: saves that step and exits 0
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(p, run, 6)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()[-2000:]
    assert b"preempted: SIGTERM" in out
    stopped = _metrics(run)[-1]["step"]
    assert os.path.isdir(run / "checkpoints" / str(stopped))  # saved exactly where it stopped

    # 2) resume, then kill -9 somewhere after the next checkpoint
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(p, run, 13)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)

    # 3) resume to the end
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    m = _metrics(run)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([r["loss"] for r in m], ref)
    ref_eval = [r.get("eval_loss") for r in _metrics(straight_run[0])]
    assert [r.get("eval_loss") for r in m] == ref_eval  # bitwise, at the same steps


@pytest.mark.slow
def test_embedded_default_trains_with_a_clear_loss_drop_then_generates(tmp_path):
    """`python train.py` with no config (the README's main job, compile included), then
    `infer.py` from its checkpoint. Its wall time is reported in the README, not asserted."""
    run = tmp_path / "tiny"
    env = _env(tmp_path / "no_cache")
    env.pop("JAX_COMPILATION_CACHE_DIR")  # the real first-run experience: compile included
    p = subprocess.run(
        [sys.executable, "train.py", "--run-dir", str(run), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    m = _metrics(run)
    assert len(m) == 200
    first, last = m[0]["loss"], np.mean([r["loss"] for r in m[-10:]])
    assert last < first - 3.0, (first, last)  # observed 6.25 -> ~2.2
    q = subprocess.run(
        [sys.executable, "infer.py", "--checkpoint", str(run), "--max-new-tokens", "8",
         "--greedy"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert q.returncode == 0, q.stderr[-3000:]
    assert "decode" in q.stdout + q.stderr and "tok/s" in q.stdout + q.stderr


def test_init_from_starts_from_the_given_params(straight_run, tmp_path, cache_dir):
    """--init-from (here a run dir; a converter output works the same) seeds a fresh run."""
    src = straight_run[0]
    run = tmp_path / "finetune"
    p = subprocess.run(
        _train_cmd(run, "--steps", "2", "--init-from", str(src)),
        cwd=REPO, env=_env(cache_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"initialised params from {src}" in p.stdout
    first = _metrics(run)[0]["loss"]
    trained = [r["loss"] for r in _metrics(src)]
    # a fresh init starts near ln(512) = 6.2; these params start where the source run ended
    assert first < trained[0] - 0.8 and abs(first - np.mean(trained[-5:])) < 0.5, (first, trained)
