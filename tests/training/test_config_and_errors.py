"""Configs load; bad meshes, bad data and diverging runs fail early, naming the fix."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import types

import jax
import pytest

from loopcoder_jax import sharding as sh
from loopcoder_jax import training as tr
from loopcoder_jax.config import ConfigError, ExperimentConfig, MeshConfig, TrainConfig, preset
from loopcoder_jax.model import LoopCoder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_shipped_configs_load_and_fit_their_mesh(path):
    exp = ExperimentConfig.from_yaml(path)
    name = os.path.basename(path)[: -len(".yaml")]
    assert exp.model == preset(name)
    assert exp.train.run_dir == f"runs/{name}"
    # the official presets must divide a 256-chip slice with their tensor size (fsdp fills)
    laptop = name.startswith("tiny")  # tiny*.yaml: CPU configs for one device
    sizes = sh.resolve_mesh_shape(exp.mesh.axis_sizes, 1 if laptop else 256)
    fake_mesh = types.SimpleNamespace(shape=sizes)
    model = LoopCoder(exp.model, exp.runtime)
    boxed = tr.abstract_boxed_params(model)
    rules = sh.get_rules(exp.mesh.rules)
    specs = jax.tree.map(
        lambda s: __import__("flax").linen.logical_to_mesh_axes(s, rules),
        __import__("flax").linen.get_partition_spec(boxed),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    sh.check_divisible(__import__("flax").linen.unbox(boxed), specs, fake_mesh, "params")


def test_overrides_and_unknown_keys():
    exp = ExperimentConfig.from_yaml(
        os.path.join(REPO, "configs", "tiny.yaml"),
        {"train.lr": "1e-3", "model.loop_num": "1", "runtime.remat": "full", "mesh.tensor": "2"},
    )
    assert exp.train.lr == 1e-3 and exp.model.loop_num == 1 and exp.runtime.remat.value == "full"
    assert exp.mesh.tensor == 2
    with pytest.raises(ConfigError, match="train.lrr"):
        ExperimentConfig.from_yaml(None, {"train.lrr": "1"})
    with pytest.raises(ConfigError, match="section.key=value"):
        ExperimentConfig.from_yaml(None, {"lr": "1"})
    with pytest.raises(ConfigError, match="not divisible by train.grad_accum=3"):
        TrainConfig(batch_size=8, grad_accum=3)
    with pytest.raises(ConfigError, match="At most one mesh axis"):
        MeshConfig(fsdp=-1, data=-1)


def test_mesh_that_does_not_fit_the_devices():
    with pytest.raises(sh.MeshError, match=r"needs 6 devices but 8 are available"):
        sh.make_mesh(MeshConfig(fsdp=3, tensor=2))
    with pytest.raises(sh.MeshError, match=r"8 devices are not divisible by the product 3"):
        sh.make_mesh(MeshConfig(fsdp=-1, tensor=3))


def test_mesh_that_does_not_divide_the_model_or_batch():
    model = LoopCoder(preset("tiny"))  # 2 kv heads, 4 query heads
    rules = sh.get_rules("fsdp_tp")
    mesh = sh.make_mesh(MeshConfig(fsdp=2, tensor=4))
    with pytest.raises(sh.MeshError) as e:
        tr.validate(model, mesh, rules, TrainConfig(batch_size=16))
    msg = str(e.value)
    assert "k_proj" in msg and "size 2, not divisible by mesh axes ('tensor',) = 4" in msg
    mesh = sh.make_mesh(MeshConfig(fsdp=8))
    with pytest.raises(sh.MeshError, match=r"micro-batch 12 .* not divisible by the 8 batch"):
        tr.validate(model, mesh, rules, TrainConfig(batch_size=12))


def _tiny_exp(tmp_path, **train):
    base = {"run_dir": str(tmp_path / "run"), "batch_size": 8, "seq_len": 32, "steps": 6}
    base.update(train)
    return ExperimentConfig.from_dict({"model": {"preset": "tiny"}, "train": base})


def test_missing_data_fails_before_training(tmp_path):
    from loopcoder_jax.data.pipeline import DataError
    from loopcoder_jax.trainer import run

    exp = _tiny_exp(tmp_path)
    exp = exp.replace(data=exp.data.replace(sources=(str(tmp_path / "nope-*.jsonl"),)))
    with pytest.raises(DataError, match="nope"):
        run(exp, progress=False)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_corrupt_data_fails_before_training(tmp_path):
    from loopcoder_jax.data.pipeline import DataError
    from loopcoder_jax.trainer import run

    bad = tmp_path / "bad.jsonl"
    bad.write_text('this is not json\n{"text": 3\n\x00\x01garbage\n' * 20)
    exp = _tiny_exp(tmp_path)
    exp = exp.replace(data=exp.data.replace(sources=(str(bad),)))
    with pytest.raises(DataError, match="bad.jsonl"):
        run(exp, progress=False)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_diverging_loss_stops_with_step_checkpoint_and_hint(tmp_path):
    from loopcoder_jax.trainer import TrainingDivergedError, run

    exp = _tiny_exp(tmp_path, lr=1e30, warmup_steps=0, clip_grad_norm=0.0, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError) as e:
        run(exp, progress=False, devices=jax.devices()[:1])
    msg = str(e.value)
    assert "at step 2" in msg and "checkpoints/1" in msg and "nan_policy=skip" in msg
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "1")  # the last good state


def test_unknown_keys_and_sections_suggest_the_nearest_valid_one(tmp_path):
    hint = r"Unknown key 'train\.lrr' \(did you mean 'train\.lr'\?\)"
    with pytest.raises(ConfigError, match=hint):
        ExperimentConfig.from_yaml(None, {"train.lrr": "1"})
    with pytest.raises(ConfigError, match=r"Unknown section 'trian' .*section is wrong.*'train'\?"):
        ExperimentConfig.from_yaml(None, {"trian.lr": "1"})
    with pytest.raises(ConfigError, match=r"did you mean 'model\.loop_num'\?"):
        ExperimentConfig.from_yaml(None, {"model.loop_nm": "1"})
    with pytest.raises(ConfigError, match=r"did you mean 'data\.eval_fraction'\?"):
        ExperimentConfig.from_dict({"data": {"eval_fractio": 0.1}})
    with pytest.raises(ConfigError, match=r"Unknown sections \['trian'\] \(did you mean 'train'"):
        ExperimentConfig.from_dict({"trian": {}})
    with pytest.raises(ConfigError) as far:  # nothing close: no suggestion, the valid list
        ExperimentConfig.from_yaml(None, {"train.zzzz": "1"})
    assert "did you mean" not in str(far.value) and "'lr'" in str(far.value)
    # through train.py: exit 2, one line naming the fix, no traceback
    p = subprocess.run(
        [sys.executable, "train.py", "--set", "train.lrr=1e-3", "--run-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
    )  # fmt: skip
    assert p.returncode == 2 and "did you mean 'train.lr'?" in p.stderr
    assert "Traceback" not in p.stderr
