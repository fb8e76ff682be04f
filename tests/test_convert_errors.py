"""Bad inputs to the converter: each gives a `CheckpointError` that names the file/tensor and the
fix, and no output directory (not even a temporary one) is left behind."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import convert
from loopcoder_jax.config import ModelConfig
from loopcoder_jax.convert import CheckpointError
from tests.convert_support import hf_config


def official_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors with every official name and shape `cfg` implies."""
    rng = np.random.default_rng(seed)
    shapes = convert.expected_hf_shapes(ModelConfig.from_hf(cfg))
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def write_hf(path, tensors: dict, cfg: dict, shards: int = 1) -> list[str]:
    """A HF checkpoint dir written with safetensors' own numpy writer (independent of ours)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for k, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {names[i]: tensors[names[i]] for i in chunk}
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        files.append(fname)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return files


def assert_refused(src, tmp_path, *needles):
    """hf-to-orbax must fail with all `needles` in the message and leave no output at all."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(CheckpointError) as err:
        convert.hf_to_orbax(src, out / "dst")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert os.listdir(out) == []  # no DST, no .dst.tmp-*
    with pytest.raises(CheckpointError):
        convert.load_hf_checkpoint(src)
    return str(err.value)


@pytest.fixture
def good(tmp_path):
    """A valid 3-shard float32 checkpoint: (dir, tensors, config)."""
    cfg = hf_config()
    tensors = official_tensors(cfg)
    write_hf(tmp_path / "good", tensors, cfg, shards=3)
    return tmp_path / "good", tensors, cfg


def test_good_checkpoint_converts(good, tmp_path):
    """The baseline the error tests mutate is itself accepted."""
    path, tensors, _ = good
    cfg, params = convert.load_hf_checkpoint(path)
    np.testing.assert_array_equal(
        params["layers"]["mlp"]["down_proj"]["kernel"][1],
        tensors["model.layers.1.mlp.down_proj.weight"].T,
    )
    convert.hf_to_orbax(path, tmp_path / "ok")
    assert os.path.exists(tmp_path / "ok" / "params" / "manifest.json")


def test_missing_tensor(good, tmp_path):
    _, tensors, cfg = good
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_hf(tmp_path / "bad", tensors, cfg)
    assert_refused(
        tmp_path / "bad",
        tmp_path,
        "missing tensors",
        "model.layers.1.mlp.up_proj.weight",
        "config.json",
    )


def test_unexpected_tensor(good, tmp_path):
    _, tensors, cfg = good
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
    write_hf(tmp_path / "bad", tensors, cfg, shards=2)
    assert_refused(tmp_path / "bad", tmp_path, "unexpected tensors", "rotary_emb.inv_freq")


def test_wrong_shape(good, tmp_path):
    _, tensors, cfg = good
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
    write_hf(tmp_path / "bad", tensors, cfg)
    assert_refused(
        tmp_path / "bad", tmp_path, "model.layers.0.self_attn.k_proj.weight", "(48, 64)", "(32, 64)"
    )


@pytest.mark.parametrize("bad_dtype,code", [(np.int32, "I32"), (np.float16, "F16")])
def test_wrong_dtype(good, tmp_path, bad_dtype, code):
    _, tensors, cfg = good
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(bad_dtype)
    write_hf(tmp_path / "bad", tensors, cfg)
    msg = assert_refused(tmp_path / "bad", tmp_path, "model.norm.weight", code, "model.safetensors")
    assert "F32" in msg  # says what the others are / what is allowed
    if code == "I32":  # never a weight, even when casting
        with pytest.raises(CheckpointError, match="I32"):
            convert.load_hf_checkpoint(tmp_path / "bad", dtype="float32")
    else:  # mixed float dtypes are fine when everything is cast anyway
        _, params = convert.load_hf_checkpoint(tmp_path / "bad", dtype="float32")
        np.testing.assert_array_equal(
            params["norm"]["scale"], tensors["model.norm.weight"].astype(np.float32)
        )


def test_truncated_shard(good, tmp_path):
    path, _, _ = good
    shard = path / "model-00002-of-00003.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    assert_refused(path, tmp_path, "truncated", "model-00002-of-00003.safetensors")


@pytest.mark.parametrize("how", ["json", "length"])
def test_corrupt_header(good, tmp_path, how):
    path, _, _ = good
    shard = path / "model-00003-of-00003.safetensors"
    with open(shard, "r+b") as f:
        if how == "json":
            f.seek(8)
            f.write(b"{not json")
        else:
            f.write(struct.pack("<Q", 2**40))
    assert_refused(path, tmp_path, "corrupt", "model-00003-of-00003.safetensors")


def test_index_points_to_missing_shard(good, tmp_path):
    path, _, _ = good
    os.remove(path / "model-00002-of-00003.safetensors")
    assert_refused(path, tmp_path, "model-00002-of-00003.safetensors", "not in", "Download")


@pytest.mark.parametrize(
    "change,needle",
    # (loop_num 1 over gate tensors is accepted with a note: tests/test_convert_official_layout.py)
    [({"num_hidden_layers": 3}, "model.layers.2."), ({"tie_word_embeddings": True}, "lm_head")],
)
def test_config_disagrees_with_weights(good, tmp_path, change, needle):
    path, _, cfg = good
    (path / "config.json").write_text(json.dumps(dict(cfg, **change)))
    assert_refused(path, tmp_path, needle, "config.json")


def test_missing_config(good, tmp_path):
    path, _, _ = good
    os.remove(path / "config.json")
    assert_refused(path, tmp_path, "No config.json")


class _Boobytrap:
    """Unpickling this creates a marker file: proof that something loaded the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_files_are_refused_never_loaded(tmp_path, name):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf_config()))
    marker = tmp_path / "unpickled"
    (src / name).write_bytes(pickle.dumps(_Boobytrap(str(marker))))
    assert_refused(src, tmp_path, "Refusing pickle", name, "safetensors")
    assert_refused(src / name, tmp_path, "Refusing pickle")
    assert not marker.exists()


def test_unreadable_orbax_group_leaves_no_hf_output(tiny_config, tmp_path):
    """A conversion that fails half way (shards partly written) leaves no DST behind."""
    params = jax.tree.map(lambda x: np.ones(x.shape, np.float32), ckpt.abstract_params(tiny_config))
    ckpt.save_params(tmp_path / "ox", tiny_config, params, group_bytes=50_000)
    groups = sorted(g for g in os.listdir(tmp_path / "ox" / "params") if g.startswith("g"))
    shutil.rmtree(tmp_path / "ox" / "params" / groups[-1])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Exception):  # noqa: B017 - Orbax's own error for the missing group
        convert.orbax_to_hf(tmp_path / "ox", out / "hf")
    assert os.listdir(out) == []


def test_params_checkpoint_not_matching_its_config(tiny_config, tmp_path):
    params = jax.tree.map(lambda x: np.ones(x.shape, np.float32), ckpt.abstract_params(tiny_config))
    ckpt.save_params(tmp_path / "ox", tiny_config, params)
    cfg = json.loads((tmp_path / "ox" / "config.json").read_text())
    (tmp_path / "ox" / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=64)))
    with pytest.raises(ValueError, match="do not match its config.json"):
        ckpt.load_params(tmp_path / "ox")


def test_save_hf_checkpoint_rejects_wrong_params_up_front(tiny_config, tmp_path):
    params = jax.tree.map(lambda x: np.ones(x.shape, np.float32), ckpt.abstract_params(tiny_config))
    params["lm_head"]["kernel"] = np.ones((3, 3), np.float32)
    with pytest.raises(CheckpointError, match="lm_head/kernel"):
        convert.save_hf_checkpoint(tiny_config, params, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unknown_config_keys_warn_but_convert(good, tmp_path):
    """Newer transformers write extra bookkeeping keys: named in a warning, not fatal."""
    path, _, cfg = good
    (path / "config.json").write_text(json.dumps(dict(cfg, layer_types=["full_attention"] * 2)))
    with pytest.warns(UserWarning, match="layer_types"):
        loaded, _ = convert.load_hf_checkpoint(path)
    assert loaded.num_hidden_layers == 2
