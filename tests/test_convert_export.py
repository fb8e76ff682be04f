"""A self-contained Hugging Face export (issue 14, items 3 and 6): `orbax-to-hf` writes the
tokenizer files (stock `LlamaTokenizer`, the chat template inside), generation_config.json and
config.json's `auto_map`; `hf-to-orbax` keeps them; `infer.py --hf EXPORT` needs no
--tokenizer. transformers loads the tokenizer without remote code and gives our ids and text.
Also: training run dirs stream through orbax-to-hf and fold; exported files are mode 0644."""

from __future__ import annotations

import json
import os
import shutil
import stat

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import checkpoint_stream, convert, hf_export
from loopcoder_jax.config import preset
from loopcoder_jax.data.tokenizer import apply_chat_template, load_tokenizer, shipped_model_path
from tests.data.test_hf_tokenizer import TEXTS, make_hf_tokenizer_dir
from tests.inference.helpers import random_params
from tests.inference.test_infer_cli import infer

transformers = pytest.importorskip("transformers")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list."}]
TOKENIZER_FILES = {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")  # vocab 512: the shipped tokenizer's size
    return cfg, jax.tree.map(np.asarray, random_params(cfg, seed=2, std=0.05))


def _export(src, dst, *extra):
    assert convert.main(["orbax-to-hf", str(src), str(dst), "--no-progress", *extra]) == 0
    return dst


def _modes(path):
    return {n: stat.S_IMODE(os.stat(os.path.join(path, n)).st_mode) for n in os.listdir(path)}


@pytest.fixture(scope="module")
def export(tiny, tmp_path_factory):
    cfg, params = tiny
    root = tmp_path_factory.mktemp("export")
    ckpt.save_params(root / "ox", cfg, params)
    shutil.copy(shipped_model_path(), root / "ox" / "tokenizer.model")
    return _export(root / "ox", root / "hf")


def test_export_is_self_contained(export, tiny):
    cfg, _ = tiny
    assert TOKENIZER_FILES | {"generation_config.json", "config.json"} <= set(os.listdir(export))
    assert set(_modes(export).values()) == {0o644}
    config = json.loads((export / "config.json").read_text())
    repo = hf_export.UPSTREAM_REPO
    assert config["auto_map"]["AutoModelForCausalLM"] == (
        f"{repo}--modeling_iquestloopcoder.IQuestLoopCoderForCausalLM"
    )
    gen = transformers.GenerationConfig.from_pretrained(str(export))
    assert (gen.temperature, gen.top_p, gen.top_k, gen.do_sample) == (0.6, 0.85, 20, True)
    assert gen.eos_token_id in (2, [2]) and list(cfg.eos_token_id) == [2]


@pytest.mark.parametrize("use_fast", [False, True])
def test_auto_tokenizer_loads_the_export_without_remote_code(export, use_fast):
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export), use_fast=use_fast)
    ours = load_tokenizer()  # the shipped tokenizer the checkpoint was made with
    for text in TEXTS:
        if "<s>" in text or "</s>" in text:  # HF splits these; a bare tokenizer.model does not
            continue
        assert hf_tok.encode(text) == ours.encode(text), text
    want = apply_chat_template(CHAT)  # ChatML: the checkpoint had no template of its own
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == want
    assert load_tokenizer(export).apply_chat_template(CHAT) == want


def test_release_tokenizer_and_template_survive_the_round_trip(tiny, tmp_path):
    """A release-style tokenizer (special tokens added above the pieces, its own template)
    goes HF -> Orbax -> HF and still gives transformers our ids and our rendered text."""
    cfg, params = tiny
    src = tmp_path / "release"
    src.mkdir()
    make_hf_tokenizer_dir(src, dummy_prefix=True)
    release = load_tokenizer(src)
    convert.save_hf_checkpoint(cfg, params, tmp_path / "hf0")
    for name in os.listdir(src):
        shutil.copy(src / name, tmp_path / "hf0" / name)
    convert.hf_to_orbax(tmp_path / "hf0", tmp_path / "ox")
    assert TOKENIZER_FILES | {"generation_config.json"} <= set(os.listdir(tmp_path / "ox"))
    out = _export(tmp_path / "ox", tmp_path / "hf1")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert hf_tok.encode(text) == release.encode(text), text
    want = release.apply_chat_template(CHAT)
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == want
    assert load_tokenizer(out).stop_ids == release.stop_ids


def test_infer_hf_export_needs_no_tokenizer_flag(export, capsys):
    argv = ["--hf", str(export), "--prompt", "def add(a, b):", "--max-new-tokens", "3"]
    assert infer.main([*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("def add(a, b):")


def _run_dir(path, cfg, params):
    """A training run dir as train.py leaves it: config.json, tokenizer.model and each step's
    params as one Orbax tree under checkpoints/<step>/params."""
    path.mkdir()
    ckpt.write_json_atomic(path / "config.json", cfg.to_hf())
    shutil.copy(shipped_model_path(), path / "tokenizer.model")
    saver = ocp.StandardCheckpointer()
    saver.save(path / "checkpoints" / "7" / "params", params)
    saver.wait_until_finished()
    return path


def test_orbax_to_hf_streams_a_training_run_dir(tiny, tmp_path, monkeypatch, capsys):
    cfg, params = tiny
    run = _run_dir(tmp_path / "run", cfg, params)

    def whole(*a, **k):
        raise AssertionError("the run dir was loaded whole")

    monkeypatch.setattr(ckpt, "load_params", whole)
    item = ckpt.resolve_params_item(str(run))
    layer = params["layers"]["mlp"]["up_proj"]["kernel"]
    slabs = [
        (start, piece)
        for path, start, piece in checkpoint_stream.iter_tree_pieces(item, layer[0].nbytes)
        if path == ("layers", "mlp", "up_proj", "kernel")
    ]
    assert [s for s, _ in slabs] == [0, 1]  # one layer per slab at this budget
    np.testing.assert_array_equal(np.concatenate([p for _, p in slabs]), layer)
    capsys.readouterr()
    argv = ["orbax-to-hf", str(run), str(tmp_path / "hf"), "--max-shard-size", "200KB"]
    assert convert.main(argv) == 0  # with the progress bar
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["tensors"] == len(convert.expected_hf_shapes(cfg)) and summary["shards"] > 1
    assert summary["bytes"] > 0 and "MB_per_s" in summary and "orbax-to-hf" in out.err
    assert set(_modes(tmp_path / "hf").values()) == {0o644}
    monkeypatch.undo()
    _, back = convert.load_hf_checkpoint(tmp_path / "hf")
    for (p, x), (_, y) in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree_util.tree_leaves_with_path(back),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y, err_msg=str(p))


def test_fold_accepts_a_training_run_dir(tmp_path):
    cfg = preset("tiny-dense")
    params = jax.tree.map(np.asarray, random_params(cfg, seed=3))
    run = _run_dir(tmp_path / "run", cfg, params)
    argv = ["fold", str(run), str(tmp_path / "fold"), "--strategy", "average", "--num-layers", "2"]
    assert convert.main([*argv, "--no-progress"]) == 0
    folded_cfg, folded = ckpt.load_params(tmp_path / "fold")
    assert folded_cfg.loop_num == 2 and folded_cfg.num_hidden_layers == 2
    want = (params["layers"]["mlp"]["down_proj"]["kernel"][[0, 1]]
            + params["layers"]["mlp"]["down_proj"]["kernel"][[2, 3]]) / 2  # fmt: skip
    np.testing.assert_allclose(folded["layers"]["mlp"]["down_proj"]["kernel"], want, rtol=1e-6)
