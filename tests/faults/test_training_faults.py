"""Faults inside the training loop (in-process `trainer.run`, real data, real Orbax).

- An update that is not finite (grad norm NaN, loss still finite) stops the run before it is
  saved; the error names the last checkpoint verified finite, never a poisoned one.
- One flipped bit in one replica of a parameter on 8 fake devices (silent data corruption)
  stops the run with a message naming the parameter and the device.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import trainer
from loopcoder_jax.config import ExperimentConfig


def _exp(tmp_path, mesh=None, loop_num=1, **train):
    base = {"run_dir": str(tmp_path / "run"), "batch_size": 8, "seq_len": 32, "steps": 6}
    base.update(train)
    # one layer (and one loop where the gate is not needed): small programs compile fast
    model = {"preset": "tiny", "num_hidden_layers": 1, "loop_num": loop_num}
    return ExperimentConfig.from_dict({"model": model, "train": base, "mesh": mesh or {}})


def test_nan_update_is_never_saved_nor_called_last_good(tmp_path):
    """Issue 10.1: lr=1e6 gives a finite loss with grad norm NaN at some step; today that
    update is applied, saved, and then named "Last good checkpoint"."""
    exp = _exp(tmp_path, lr=1e6, warmup_steps=4, checkpoint_every=1, steps=12)
    with pytest.raises(trainer.TrainingDivergedError) as e:
        trainer.run(exp, progress=False, devices=jax.devices()[:1])
    msg = str(e.value)
    run = tmp_path / "run"
    steps = ckpt.finished_steps(run)
    assert steps, "the finite steps before the divergence are checkpointed"
    bad_step = int(msg.split(" at step ")[1].split(":")[0])
    assert steps[-1] == bad_step - 1  # the non-finite update was not saved
    assert f"Last checkpoint verified finite: {run}/checkpoints/{steps[-1]}." in msg
    assert "grad norm nan" in msg
    # every checkpoint left behind holds finite values only
    for step in steps:
        c = ckpt.TrainCheckpointer(run)
        manifest = c.saved_manifest(step)
        c.close()
        assert manifest["nonfinite"] == []
    _, params = ckpt.load_params(run)
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(params))


def _flip_one_bit(x, device_id: int):
    """`x` rebuilt from its per-device buffers with one bit flipped in `device_id`'s copy."""
    buffers = []
    for shard in x.addressable_shards:
        data = np.array(shard.data)
        if shard.device.id == device_id:
            data.view(np.uint32).flat[0] ^= 1 << 4
        buffers.append(jax.device_put(data, shard.device))
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, buffers)


def test_flipped_bit_in_one_replica_stops_the_run_naming_parameter_and_device(
    tmp_path, monkeypatch
):
    """Issue 10 (SDC): data=4 x fsdp=2 on 8 fake devices; after step 2 one replica of the
    gate bias changes by one bit, as a faulty chip would do it."""
    victim = jax.devices()[5]
    real_make = trainer.tr.make_train_step

    def make_faulty_step(*args, **kwargs):
        step_fn = real_make(*args, **kwargs)

        def faulty(state, batch):
            state, metrics = step_fn(state, batch)
            if int(jax.device_get(state.step)) == 2:
                params = jax.tree.map(lambda x: x, state.params)
                gate = params["layers"]["self_attn"]["loop_gate"]
                gate["bias"] = _flip_one_bit(gate["bias"], victim.id)
                state = state.replace(params=params)
            return state, metrics

        return faulty

    monkeypatch.setattr(trainer.tr, "make_train_step", make_faulty_step)
    mesh = {"data": 4, "fsdp": 2}
    exp = _exp(tmp_path, mesh, loop_num=2, integrity_every=1, checkpoint_every=1)
    with pytest.raises(trainer.SilentCorruptionError) as e:
        trainer.run(exp, progress=False, devices=jax.devices()[:8])
    msg = str(e.value)
    assert "at step 2" in msg
    assert "['params']['layers']['self_attn']['loop_gate']['bias']" in msg
    assert f"device {victim.id} (process 0)" in msg
    run = tmp_path / "run"
    assert ckpt.finished_steps(run) == [1]  # the corrupted state was not saved
    assert f"Last checkpoint verified finite: {run}/checkpoints/1." in msg
    assert not os.path.exists(run / ".lock")  # released on the way out
