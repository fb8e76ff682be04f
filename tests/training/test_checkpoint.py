"""Train-state checkpoints: restore onto another mesh, run dirs as params checkpoints, atomicity."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import sharding as sh
from loopcoder_jax import training as tr
from loopcoder_jax.config import MeshConfig, TrainConfig
from loopcoder_jax.model import LoopCoder

RULES = sh.get_rules("fsdp_tp")
TC = TrainConfig(batch_size=8, seq_len=16, steps=10)


def _abstract_on(model, opt, mesh):
    abstract, shard = tr.state_shardings(model, opt, mesh, RULES)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard
    )


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run dir with one checkpoint written from an (fsdp=4, tensor=2) mesh."""
    from loopcoder_jax.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_theta=10000.0, loop_num=2, loop_window_size=4, eos_token_id=(2,),
        torch_dtype="float32",
    )  # fmt: skip
    run = tmp_path_factory.mktemp("run")
    model, opt = LoopCoder(cfg), tr.make_optimizer(TC)
    mesh = sh.make_mesh(MeshConfig(fsdp=4, tensor=2), jax.devices()[:8])
    state = tr.make_init_fn(model, opt, mesh, RULES)(jax.random.key(3))
    # make the Adam moments non-trivial so a mix-up of mu/nu/params would show
    state = state.replace(
        opt_state=jax.tree.map(lambda x: x + 0.25 if x.ndim else x, state.opt_state)
    )
    ckpt.write_json_atomic(os.path.join(run, ckpt.CONFIG_FILE), cfg.to_hf())
    c = ckpt.TrainCheckpointer(run, keep=2)
    c.save(7, state, data_state={"shards": {"0": {"pos": 7}}}, meta={"loss": 1.5})
    c.close()
    host = jax.tree.map(np.asarray, state)
    return run, cfg, model, opt, host


@pytest.mark.parametrize(
    "mesh_cfg,n", [(MeshConfig(fsdp=1), 1), (MeshConfig(data=2, fsdp=1, tensor=2), 4)]
)
def test_restore_onto_a_different_mesh(saved_run, mesh_cfg, n):
    run, _, model, opt, host = saved_run
    mesh = sh.make_mesh(mesh_cfg, jax.devices()[:n])
    c = ckpt.TrainCheckpointer(run)
    assert c.latest_step() == 7
    state, meta = c.restore(7, _abstract_on(model, opt, mesh))
    assert meta == {"step": 7, "loss": 1.5}
    assert int(state.step) == 7
    got_leaves = jax.tree.leaves((state.params, state.opt_state))
    want_leaves = jax.tree.leaves((host.params, host.opt_state))
    for got, want in zip(got_leaves, want_leaves, strict=True):
        assert got.sharding.mesh.shape == mesh.shape
        np.testing.assert_array_equal(np.asarray(got), want)
    assert c.data_states(7) == [{"shards": {"0": {"pos": 7}}}]
    c.close()


def test_load_params_accepts_a_run_dir(saved_run):
    run, cfg, _, _, host = saved_run
    got_cfg, params = ckpt.load_params(run)
    assert got_cfg == cfg
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(host.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_unfinished_step_dirs_are_not_checkpoints(saved_run, tmp_path):
    run = saved_run[0]
    # what a save killed mid-way leaves behind: Orbax's temporary step directory
    leftover = os.path.join(run, "checkpoints", "9.orbax-checkpoint-tmp-123")
    os.makedirs(os.path.join(leftover, "params"))
    try:
        assert ckpt.finished_steps(run) == [7]
        assert ckpt.resolve_params_item(str(run)).endswith(os.path.join("7", "params"))
    finally:
        os.rmdir(os.path.join(leftover, "params"))
        os.rmdir(leftover)
    empty = tmp_path / "killed_before_first_save"
    empty.mkdir()
    (empty / ckpt.CONFIG_FILE).write_text(open(os.path.join(run, ckpt.CONFIG_FILE)).read())
    with pytest.raises(ckpt.CheckpointNotFoundError, match="first checkpoint"):
        ckpt.load_params(empty)


def test_missing_data_state_is_a_clear_error(saved_run, tmp_path):
    _, _, model, opt, host = saved_run
    mesh = sh.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    state = jax.device_put(host, jax.tree.map(lambda a: a.sharding, _abstract_on(model, opt, mesh)))
    c = ckpt.TrainCheckpointer(tmp_path, async_save=False)
    c.save(1, state)  # no data state
    c.wait()
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no data-iterator state"):
        c.data_states(1)
    c.close()
