"""gs:// paths against a real GCS emulator (fake-gcs-server on 127.0.0.1, see conftest.py):
the storage layer, params checkpoints (converter output, load_params), and train.py killed
with -9 and resumed from the bucket, bitwise equal to a straight run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import convert, storage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: rng.standard_normal(x.shape).astype(x.dtype), ckpt.abstract_params(cfg)
    )


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_commit_file_is_orbaxs():
    import orbax.checkpoint as ocp

    assert storage.COMMIT_FILE == ocp.path.atomicity.COMMIT_SUCCESS_FILE


def test_path_helpers_keep_local_paths_local(tmp_path):
    assert storage.is_remote("gs://b/x") and not storage.is_remote(str(tmp_path))
    assert not storage.is_remote("file:///tmp/x")
    assert storage.resolve("gs://b/run/") == "gs://b/run"
    assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.resolve("rel") == os.path.abspath("rel")


def test_missing_backend_is_a_clear_error(monkeypatch):
    import fsspec

    def no_gcsfs(*a, **k):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_gcsfs)
    with pytest.raises(storage.RemoteStorageError, match=r"loopcoder-jax\[gcs\]"):
        storage.exists("gs://bucket/run")
    with pytest.raises(storage.RemoteStorageError, match="s3:// is not supported"):
        storage.exists("s3://bucket/run")


def test_train_into_a_missing_bucket_exits_2_naming_the_bucket(gcs, capsys):
    import train

    args = ["--run-dir", "gs://no-such-bucket/run", "--steps", "1", "--no-progress",
            "--set", "train.batch_size=8", "--set", "data.startup_check_records=50"]  # fmt: skip
    rc = train.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "gs://no-such-bucket/run/config.json" in err and "bucket exists" in err


def test_storage_sees_what_tensorstore_wrote(gcs):
    """Orbax writes arrays through tensorstore, behind gcsfs's back: listings and existence
    checks must not come from a stale cache."""
    import tensorstore as ts

    d = gcs.path("fresh")
    storage.write_json(storage.join(d, "a.json"), {"x": 1})
    assert storage.listdir(d) == ["a.json"]
    kv = ts.KvStore.open(gcs.path("")).result()
    kv.write("fresh/b.bin", b"written by tensorstore").result()
    assert storage.exists(storage.join(d, "b.bin"))
    assert sorted(storage.listdir(d)) == ["a.json", "b.bin"]
    assert storage.read_json(storage.join(d, "a.json")) == {"x": 1}
    storage.rmtree(d)
    assert not storage.exists(d)


def test_params_checkpoint_round_trip_and_commit_file(gcs, tiny_config):
    params = _random_params(tiny_config)
    dst = gcs.path("params", "a")
    assert ckpt.save_params(dst, tiny_config, params, group_bytes=40_000) == dst
    assert storage.is_committed(dst)
    cfg, got = ckpt.load_params(dst)
    assert cfg == tiny_config
    _assert_same(got, params)
    with pytest.raises(FileExistsError, match="--overwrite"):
        ckpt.save_params(dst, tiny_config, params)
    other = _random_params(tiny_config, seed=1)
    ckpt.save_params(dst + "/", tiny_config, other, overwrite=True)
    _assert_same(ckpt.load_params(dst)[1], other)


def test_a_killed_writer_leaves_nothing_that_loads(gcs, tiny_config):
    """No rename on an object store: a writer that dies before its commit file (here: one
    abandoned mid-write, so none of its clean-up runs, as under kill -9) leaves objects that
    every reader refuses; an exception inside the `with` removes what was written."""
    params = _random_params(tiny_config)
    dst = gcs.path("params", "killed")
    writer = ckpt.ParamsWriter(dst, tiny_config, group_bytes=40_000)
    for leaf_path, leaf in ckpt._leaves_with_paths(params):
        writer.add(leaf_path, leaf, shape=leaf.shape, start=0 if leaf_path[0] == "layers" else None)
    writer._flush()  # Orbax groups are in the bucket; manifest, config and commit file are not
    assert storage.exists(storage.join(dst, "params")) and not storage.is_committed(dst)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="incomplete.*--overwrite"):
        ckpt.load_params(dst)
    ckpt.save_params(dst, tiny_config, params, overwrite=True)  # the fix the message names
    _assert_same(ckpt.load_params(dst)[1], params)

    failed = gcs.path("params", "failed")
    with pytest.raises(RuntimeError, match="boom"):
        with ckpt.ParamsWriter(failed, tiny_config) as w:
            w.add(("norm", "scale"), np.ones(64, np.float32), shape=(64,))
            w._flush()
            raise RuntimeError("boom")
    assert not storage.exists(failed)


def test_converter_writes_to_and_reads_from_the_bucket(gcs, tiny_config, tmp_path, capsys):
    params = _random_params(tiny_config)
    hf = tmp_path / "hf"
    convert.save_hf_checkpoint(tiny_config, params, hf)
    dst = gcs.path("converted")
    assert convert.main(["hf-to-orbax", str(hf), dst, "--no-progress", "--piece-mb", "1"]) == 0
    _, got = ckpt.load_params(dst)
    _assert_same(got, params)
    # back to HF from the bucket; HF output itself is written locally (atomic rename)
    assert convert.main(["orbax-to-hf", dst, str(tmp_path / "back"), "--no-progress"]) == 0
    _assert_same(convert.load_hf_checkpoint(tmp_path / "back")[1], params)
    capsys.readouterr()
    assert convert.main(["orbax-to-hf", dst, gcs.path("hf-out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "local path" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- training runs
def test_train_checkpointer_commits_and_restores_in_the_bucket(gcs, tiny_config):
    """Orbax's CheckpointManager on gs://: a step counts once its commit file is written; a
    step directory without one (a save killed mid-way) is neither listed nor loaded."""
    from loopcoder_jax import sharding as sh
    from loopcoder_jax import training as tr
    from loopcoder_jax.config import MeshConfig, TrainConfig
    from loopcoder_jax.model import LoopCoder

    rules = sh.get_rules("fsdp_tp")
    model, opt = LoopCoder(tiny_config), tr.make_optimizer(TrainConfig(steps=10))
    mesh = sh.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    state = tr.make_init_fn(model, opt, mesh, rules)(jax.random.key(3))
    abstract, shard = tr.state_shardings(model, opt, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard
    )
    run = gcs.path("ckpt-run")
    ckpt.write_json_atomic(storage.join(run, ckpt.CONFIG_FILE), tiny_config.to_hf())
    c = ckpt.TrainCheckpointer(run, keep=2)
    c.save(3, state, data_state={"shards": {"0": {"pos": 3}}}, meta={"loss": 1.5})
    c.close()
    assert storage.is_committed(c.step_dir(3))
    # what a save killed mid-way leaves on an object store: <step>/ without its commit file
    storage.write_bytes(storage.join(run, "checkpoints", "5", "params", "x"), b"partial")
    assert ckpt.finished_steps(run) == [3]
    assert ckpt.resolve_params_item(run) == storage.join(run, "checkpoints", "3", "params")

    c = ckpt.TrainCheckpointer(run)  # Orbax removes uncommitted steps when it opens a run
    assert not storage.exists(storage.join(run, "checkpoints", "5"))
    assert c.latest_step() == 3
    got, meta = c.restore(3, abstract)
    assert meta == {"step": 3, "loss": 1.5}
    _assert_same((got.params, got.opt_state), (state.params, state.opt_state))
    assert c.data_states(3) == [{"shards": {"0": {"pos": 3}}}]
    c.save(5, got, data_state={"shards": {"0": {"pos": 5}}})
    c.close()
    assert ckpt.finished_steps(run) == [3, 5]
    _assert_same(ckpt.load_params(run)[1], state.params)


def test_metrics_log_in_the_bucket_covers_checkpoints_and_drops_rerun_steps(gcs):
    """No appends on an object store: the log is rewritten by flush() (before each checkpoint
    save) and close(); a resumed run keeps the lines up to its checkpoint only."""
    from loopcoder_jax.trainer import MetricsLog

    run = gcs.path("metrics-run")
    log = MetricsLog(run, resume_step=0, tensorboard=False)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step)})
    log.flush()  # what the trainer does right before saving step 3
    log.write({"step": 4, "loss": 4.0})  # then killed -9: step 4 never uploaded
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
    log = MetricsLog(run, resume_step=2, tensorboard=False)  # resumed from step 2
    log.write({"step": 3, "loss": 3.5})
    log.close()
    assert [(r["step"], r["loss"]) for r in _metrics(run)] == [(1, 1.0), (2, 2.0), (3, 3.5)]


def _metrics(run_dir) -> list[dict]:
    text = storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------- train.py
STEPS = 6
TRAIN = [
    "--no-progress",
    "--steps", str(STEPS),
    "--set", "train.batch_size=4",
    "--set", "train.seq_len=32",
    "--set", "train.warmup_steps=2",
    "--set", "data.startup_check_records=50",
]  # fmt: skip


def _env(gcs, cache_dir):
    env = dict(os.environ)
    env.update(gcs.env)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in _metrics(run_dir)]


@pytest.mark.slow  # three train.py processes: ~35 s of CPU, past the CI budget
def test_train_kill9_resume_from_the_bucket_is_exact(gcs, tmp_path):
    """train.py --run-dir gs://...: kill -9 once a checkpoint is committed, resume from the
    bucket; the losses equal a straight run's bitwise, and so do the final params."""
    env = _env(gcs, tmp_path / "jax_cache")
    straight, run = gcs.path("straight"), gcs.path("run")
    cmd = lambda d, every: [sys.executable, "train.py", "--run-dir", d, *TRAIN,  # noqa: E731
                            "--set", f"train.checkpoint_every={every}"]  # fmt: skip
    p = subprocess.run(cmd(straight, 100), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    ref = _losses(straight)
    assert len(ref) == STEPS

    # kill -9 once a checkpoint is committed in the bucket, before the run ends
    p = subprocess.Popen(cmd(run, 2), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)  # fmt: skip
    t0 = time.time()
    while not ckpt.finished_steps(run):
        assert p.poll() is None, p.communicate()[1].decode()[-3000:]
        assert time.time() - t0 < 300, "no checkpoint committed in 300 s"
        time.sleep(0.25)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    killed_at = ckpt.finished_steps(run)
    assert killed_at and killed_at[-1] < STEPS, killed_at

    p = subprocess.run(cmd(run, 2), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/" in p.stdout
    np.testing.assert_array_equal(_losses(run), ref)
    # the run dir is a params checkpoint too (infer.py --checkpoint / --init-from)
    cfg, params = ckpt.load_params(run)
    _, ref_params = ckpt.load_params(straight)
    _assert_same(params, ref_params)
    # and infer.py generates from it, tokenizer included
    p = subprocess.run([sys.executable, "infer.py", "--checkpoint", run, "--max-new-tokens", "4"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
