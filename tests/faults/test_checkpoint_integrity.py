"""Checksummed checkpoints: damaged steps are found, skipped with a reason, never trusted.

One tiny train state is saved as steps 1, 2, 3 (real Orbax); each test damages a copy of that
run dir the way a disk, a network filesystem or a human would, and resumes from it.
"""

from __future__ import annotations

import os
import re
import shutil

import jax
import numpy as np
import pytest

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import checkpoint_integrity as integrity
from loopcoder_jax import training as tr
from tests.faults.conftest import RULES


def _abstract(model, opt, mesh):
    abstract, shard = tr.state_shardings(model, opt, mesh, RULES)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_state):
    run = tmp_path_factory.mktemp("run")
    model, opt, mesh, state = tiny_state
    c = ckpt.TrainCheckpointer(run, keep=5, async_save=False)
    states = {}
    for step in (1, 2, 3):
        state = state.replace(params=jax.tree.map(lambda x: x * 1.5, state.params))
        c.save(step, state, data_state={"shards": {"0": {"pos": step}}})
        states[step] = jax.tree.map(np.asarray, state.params)
    c.close()
    return run, model, opt, mesh, states, state


@pytest.fixture
def run_copy(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved[0], run)
    return run


def _largest_file(step_dir) -> str:
    files = [os.path.join(d, n) for d, _, ns in os.walk(step_dir) for n in ns]
    return max(files, key=os.path.getsize)


def _resume(saved, run):
    _, model, opt, mesh, *_ = saved
    logs = []
    c = ckpt.TrainCheckpointer(run)
    try:
        return c.restore_verified(_abstract(model, opt, mesh), log=logs.append), logs
    finally:
        c.close()


def test_intact_run_resumes_from_the_newest_step_bitwise(saved, run_copy):
    (step, state, _, data), logs = _resume(saved, run_copy)
    assert step == 3 and logs == [] and data == [{"shards": {"0": {"pos": 3}}}]
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved[4][3]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("damage", ["flip_4000_bytes", "truncate", "rewritten_params"])
def test_damaged_newest_step_is_skipped_with_the_reason(saved, run_copy, damage):
    step_dir = run_copy / "checkpoints" / "3"
    if damage == "rewritten_params":
        # finite, plausible values that differ in one element: only the checksums see it
        import orbax.checkpoint as ocp

        params = jax.tree.map(np.array, saved[4][3])
        params["norm"]["scale"][5] += 1e-3
        shutil.rmtree(step_dir / "params")
        writer = ocp.StandardCheckpointer()
        writer.save(step_dir / "params", params)
        writer.wait_until_finished()
    else:
        victim = _largest_file(step_dir)
        data = bytearray(open(victim, "rb").read())
        mid = len(data) // 2
        if damage == "flip_4000_bytes":  # garbage in the middle of the array data
            for i in range(mid, mid + 4000):
                data[i] ^= 0xFF
        else:
            data = data[:mid]
        with open(victim, "wb") as f:
            f.write(data)
    (step, state, _, _), logs = _resume(saved, run_copy)
    assert step == 2
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved[4][2]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    why = {"flip_4000_bytes": "unreadable|NaN|checksum", "truncate": "unreadable",
           "rewritten_params": r"checksum mismatch in \['params'\]\['norm'\]"}[damage]  # fmt: skip
    assert any("skipped checkpoint" in m and "checkpoints/3" in m for m in logs), logs
    assert any(re.search(why, m) for m in logs), logs[0]
    # the damaged step is kept for a post-mortem, under a name that is no longer a step
    assert ckpt.finished_steps(run_copy) == [1, 2]
    assert any(n.startswith("3.damaged-") for n in os.listdir(run_copy / "checkpoints"))


def test_no_step_verifies_is_an_error_naming_every_step(saved, run_copy):
    for step in (1, 2, 3):
        victim = _largest_file(run_copy / "checkpoints" / str(step))
        os.truncate(victim, os.path.getsize(victim) // 3)
    with pytest.raises(ckpt.CheckpointCorruptError) as e:
        _resume(saved, run_copy)
    msg = str(e.value)
    for step in (1, 2, 3):
        assert f"step {step}: unreadable" in msg
    assert "new --run-dir" in msg
    assert ckpt.finished_steps(run_copy) == [1, 2, 3]  # nothing renamed or deleted


def test_step_without_manifest_is_restored_unverified_with_a_note(saved, run_copy):
    """Steps written before checksums existed (no `integrity` item) still resume."""
    shutil.rmtree(run_copy / "checkpoints" / "3" / ckpt.INTEGRITY_ITEM)
    (step, _, _, _), logs = _resume(saved, run_copy)
    assert step == 3
    assert any("predates checksums" in m for m in logs), logs


def test_non_finite_state_is_never_saved(saved, tmp_path):
    state = saved[5]
    params = dict(state.params)
    params["norm"] = jax.tree.map(lambda x: x.at[0].set(np.nan), params["norm"])
    c = ckpt.TrainCheckpointer(tmp_path, async_save=False)
    with pytest.raises(ckpt.NonFiniteStateError, match=r"\['norm'\]"):
        c.save(5, state.replace(params=params))
    c.close()
    assert ckpt.finished_steps(tmp_path) == []


def test_checksums_do_not_depend_on_the_mesh():
    """The same array on one device and sharded 8 ways: the same numbers."""
    from jax.sharding import NamedSharding, PartitionSpec

    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", "b")))
    one = integrity.digest({"x": jax.device_put(x, jax.devices()[0])})
    assert one == integrity.digest({"x": sharded})
    # absolute check: the first number is the wrapping sum of the uint32 words, computed here
    words = x.view(np.uint32).astype(np.uint64)
    assert one["leaves"]["['x']"]["checksum"][0] == int(words.sum() % 2**32)
    # one flipped bit anywhere changes it, and compare() says where
    flipped = x.copy()
    flipped.view(np.uint32)[3, 2] ^= 1 << 7
    assert "['x']" in integrity.compare(one, integrity.digest({"x": flipped}))
