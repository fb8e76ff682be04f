"""The disk fills up while saving: a clear error at once, nothing half-written left behind."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from loopcoder_jax import checkpoint as ckpt
from tests.faults._small_fs import small_filesystem


def test_train_checkpoint_save_fails_clearly_and_leaves_no_partial_step(tiny_state, tmp_path):
    *_, state = tiny_state  # ~1.6 MB of params + Adam moments
    with small_filesystem(tmp_path / "fs", 256 * 1024) as (root, kind):
        run = os.path.join(root, "run")
        c = ckpt.TrainCheckpointer(run, async_save=True)
        c.save(1, state, data_state={"shards": {}})  # returns; the write fails in background
        with pytest.raises(ckpt.CheckpointSaveError) as e:
            c.wait()
        c.manager.close()
        msg = str(e.value)
        assert f"{run}/checkpoints/1 failed" in msg and "rerun the same command" in msg
        if kind == "tmpfs":
            assert "disk is full" in msg
        assert ckpt.finished_steps(run) == []
        assert os.listdir(os.path.join(run, "checkpoints")) == []  # partial files removed


def test_params_writer_leaves_no_tmp_dir_when_the_disk_fills(tiny_state, tiny_config, tmp_path):
    """The converter's writer (`ParamsWriter`, via save_params): today a failure in its final
    flush leaves `.<name>.tmp-*` behind."""
    params = jax.tree.map(np.asarray, tiny_state[3].params)
    with small_filesystem(tmp_path / "fs", 256 * 1024) as (root, _):
        with pytest.raises(Exception):  # noqa: B017  (whatever the storage layer raises)
            ckpt.save_params(os.path.join(root, "model.orb"), tiny_config, params)
        assert os.listdir(root) == []
