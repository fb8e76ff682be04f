"""Converter edge inputs (issue 10, item 6): non-regular weight files and shard paths that leave
the checkpoint directory are refused before anything is opened; a file as DST is refused.
Every refusal is a `CheckpointError` (CLI: exit 2, no traceback) and nothing is written."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from loopcoder_jax import convert
from loopcoder_jax.convert import CheckpointError
from tests.convert_support import hf_config
from tests.test_convert_errors import official_tensors, write_hf


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    cfg = hf_config()
    path = tmp_path_factory.mktemp("good") / "hf"
    write_hf(path, official_tensors(cfg), cfg, shards=2)
    return path, cfg


def _refused(src, tmp_path, *needles):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(CheckpointError) as err:
        convert.hf_to_orbax(src, out / "dst")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert os.listdir(out) == []
    return str(err.value)


def _single(tmp_path, cfg):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_fifo_named_model_safetensors_is_refused_without_opening(tmp_path, good):
    _, cfg = good
    src = _single(tmp_path, cfg)
    os.mkfifo(src / "model.safetensors")
    result = {}
    # Opening a FIFO with no writer blocks forever: run in a thread so a regression fails.
    t = threading.Thread(target=lambda: result.update(msg=_refused(src, tmp_path)), daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # unblock the open() so the thread can end
        with open(src / "model.safetensors", "wb"):
            pass
        pytest.fail("hf-to-orbax hung opening a FIFO named model.safetensors")
    assert "not a regular file" in result["msg"]


def test_directory_named_model_safetensors(tmp_path, good):
    _, cfg = good
    src = _single(tmp_path, cfg)
    (src / "model.safetensors").mkdir()
    _refused(src, tmp_path, "model.safetensors", "not a regular file")


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_index_shard_paths_outside_the_directory(tmp_path, good, where, monkeypatch):
    path, _ = good
    src = tmp_path / "src"
    shutil.copytree(path, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    old = index["weight_map"][first]
    outside = tmp_path / "outside.safetensors"  # a valid shard, but not in the checkpoint dir
    shutil.copy(src / old, outside)
    shard = "../outside.safetensors" if where == "dotdot" else str(outside)
    index["weight_map"] = {k: shard if v == old else v for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    os.remove(src / old)
    opened = []
    real_open, real_os_open = open, os.open

    def spy(file, *a, **k):
        opened.append(os.fspath(file))
        return real_open(file, *a, **k)

    def os_spy(file, *a, **k):
        opened.append(os.fspath(file))
        return real_os_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr(os, "open", os_spy)
    _refused(src, tmp_path, shard, "outside")
    assert not any(f.endswith(".safetensors") for f in opened), opened


def test_symlinked_shard_pointing_out_of_the_directory(tmp_path, good):
    path, _ = good
    src = tmp_path / "src"
    shutil.copytree(path, src)
    outside = tmp_path / "elsewhere.safetensors"
    shard = src / "model-00001-of-00002.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    _refused(src, tmp_path, "model-00001-of-00002.safetensors", "outside")


def test_hugging_face_cache_symlinks_are_accepted(tmp_path, good):
    """snapshots/<rev>/X -> ../../blobs/<hash>: how `huggingface_hub` stores downloads."""
    path, _ = good
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(path))):
        shutil.copy(path / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / name)
    cfg, _ = convert.load_hf_checkpoint(snap)
    assert cfg.num_hidden_layers == 2


@pytest.mark.parametrize("overwrite", [False, True])
def test_destination_that_is_a_file(tmp_path, good, overwrite, capsys):
    path, _ = good
    dst = tmp_path / "dst"
    dst.write_text("keep me")
    argv = ["hf-to-orbax", str(path), str(dst), "--no-progress"]
    assert convert.main(argv + (["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err
    assert dst.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["dst"]
