"""infer.py: the CLI end to end on real Orbax checkpoints and the shipped SentencePiece model.

Runs `infer.main(argv)` in-process (the engine and its compiled programs are shared across
calls via `generate.get_engine`); the no-argument default is checked from a scratch cwd.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from loopcoder_jax import checkpoint
from loopcoder_jax.config import preset
from loopcoder_jax.data.tokenizer import load_tokenizer, shipped_model_path
from loopcoder_jax.generate import generate

from .helpers import random_params, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEW = 24


def _load_infer():
    spec = importlib.util.spec_from_file_location("infer_cli", os.path.join(REPO, "infer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


infer = _load_infer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A params checkpoint of the `tiny` preset (vocab 512 = the shipped tokenizer)."""
    cfg = preset("tiny")
    params = random_params(cfg, seed=4, std=0.05)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    checkpoint.save_params(path, cfg, params)
    shutil.copy(shipped_model_path(), os.path.join(path, "tokenizer.model"))
    return cfg, params, path


def _greedy_text(cfg, params, text: str) -> tuple[str, list[int]]:
    tok = load_tokenizer()
    stop = sorted({*cfg.eos_token_id, *tok.stop_ids})
    ids = generate(cfg, params, [tok.encode(text)], NEW, eos_ids=stop)[0]
    if ids and ids[-1] in stop:
        ids = ids[:-1]
    return tok.decode(ids), ids


def test_prompts_file_to_output_jsonl(ckpt, tmp_path):
    cfg, params, path = ckpt
    msgs = [{"role": "user", "content": "Write a sort function."}]
    rows = [
        {"prompt": "def fibonacci(n):", "id": "a"},
        {"messages": msgs, "id": "b"},
        {"prompt": "import os\nimport", "id": "c"},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    argv = ["--checkpoint", path, "--prompts-file", str(src), "--output", str(dst)]
    # Continuous batching: 3 prompts through 2 slots, prompts prefilled 16 tokens at a time.
    extra = ["--batch-size", "2", "--prefill-chunk", "16"]
    assert infer.main([*argv, "--max-new-tokens", str(NEW), *extra]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c"]  # input keys kept, order kept
    assert os.listdir(dst.parent) == ["out.jsonl"]  # no temp file left behind
    tok = load_tokenizer()
    texts = ["def fibonacci(n):", tok.apply_chat_template(msgs), "import os\nimport"]
    for o, text in zip(out, texts, strict=True):
        want, ids = _greedy_text(cfg, params, text)
        assert o["completion"] == want
        assert o["finish_reason"] in ("stop", "length") and o["num_tokens"] >= len(ids)
        assert o["num_tokens"] <= NEW
    assert out[0]["completion"] != out[2]["completion"]


def test_single_prompt_streams_the_greedy_completion(ckpt, capsys):
    cfg, params, path = ckpt
    prompt = "class Stack:"
    assert infer.main(["--checkpoint", path, "--prompt", prompt, "--max-new-tokens", str(NEW)]) == 0
    captured = capsys.readouterr()
    want, _ = _greedy_text(cfg, params, prompt)
    assert captured.out.rstrip("\n") == prompt + want
    assert "KV cache:" in captured.err and "tok/s" in captured.err
    assert "prefill:" in captured.err and "decode:" in captured.err


def _expect_error(argv, match, capsys):
    assert infer.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    return err


def test_no_default_run_says_to_train_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _expect_error([], "run `python train.py` first", capsys)


def test_default_args_generate_from_runs_tiny(ckpt, tmp_path, monkeypatch, capsys):
    cfg, params, path = ckpt
    shutil.copytree(path, tmp_path / "runs" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert infer.main(["--max-new-tokens", str(NEW)]) == 0
    want, _ = _greedy_text(cfg, params, infer.DEFAULT_PROMPT)
    assert capsys.readouterr().out.rstrip("\n") == infer.DEFAULT_PROMPT + want


def test_tokenizer_larger_than_model_vocab(tmp_path, capsys):
    cfg = tiny_cfg()  # vocab 128 < the shipped tokenizer's 512
    path = checkpoint.save_params(tmp_path / "small", cfg, random_params(cfg))
    shutil.copy(shipped_model_path(), os.path.join(path, "tokenizer.model"))
    _expect_error(["--checkpoint", path], "512 pieces but the model only 128", capsys)


def test_checkpoint_config_mismatch(ckpt, tmp_path, capsys):
    _, _, path = ckpt
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg_json = json.loads((bad / "config.json").read_text())
    cfg_json["intermediate_size"] = 256
    (bad / "config.json").write_text(json.dumps(cfg_json))
    _expect_error(["--checkpoint", str(bad)], "do not match its config.json", capsys)


def test_mesh_that_does_not_divide_kv_heads(ckpt, capsys):
    _, _, path = ckpt
    _expect_error(["--checkpoint", path, "--mesh", "tensor=4"], "num_key_value_heads=2", capsys)


def test_prompt_longer_than_context(ckpt, tmp_path, capsys):
    _, _, path = ckpt
    long_prompt = "x = 1\n" * 2000
    _expect_error(["--checkpoint", path, "--prompt", long_prompt], "context is 2048", capsys)


def test_bad_prompts_file_line_writes_nothing(ckpt, tmp_path, capsys):
    _, _, path = ckpt
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "a"}\n{"text": "no prompt key"}\n')
    argv = ["--checkpoint", path, "--prompts-file", str(src), "--output", str(dst)]
    _expect_error(argv, "in.jsonl:2", capsys)
    assert not dst.exists()


def test_empty_prompt_is_rejected(ckpt, tmp_path, capsys):
    _, _, path = ckpt
    src = tmp_path / "in.jsonl"
    src.write_text("\n\n")
    argv = ["--checkpoint", path, "--prompts-file", str(src), "--output", str(tmp_path / "o")]
    _expect_error(argv, "has no prompts", capsys)


def test_help_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "infer.py", "--help"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "--prompts-file" in out.stdout


@pytest.mark.slow
def test_train_then_infer_with_no_arguments(tmp_path):
    """The embedded default end to end: `python train.py` (shortened) then `python infer.py`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    for name in ("train.py", "infer.py", "configs"):
        src = os.path.join(REPO, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, tmp_path / name)
    train = subprocess.run(
        [sys.executable, "train.py", "--steps", "4", "--set", "train.checkpoint_every=2",
         "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert os.path.isfile(tmp_path / "runs" / "tiny" / "tokenizer.model")
    out = subprocess.run(
        [sys.executable, "infer.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("def fibonacci(n):")
    assert "[finish_reason: " in out.stderr
    assert int(re.search(r"decode: (\d+) tokens", out.stderr).group(1)) >= 1


def test_hf_checkpoint_is_converted_on_the_fly(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from loopcoder_jax.convert import hf_to_params
    from tests.reference.torch_loopcoder import TorchLoopCoder, save_hf_checkpoint_torch

    torch.set_num_threads(1)
    cfg = preset("tiny")
    ref = TorchLoopCoder(cfg.to_hf()).init_random_(seed=9, std=0.05).eval()
    save_hf_checkpoint_torch(ref, cfg.to_hf(), tmp_path / "hf")
    params = hf_to_params(cfg, {k: v.numpy() for k, v in ref.state_dict().items()})
    prompt = "def add(a, b):"
    argv = ["--hf", str(tmp_path / "hf"), "--tokenizer", shipped_model_path(), "--prompt", prompt]
    assert infer.main([*argv, "--max-new-tokens", str(NEW), "--no-stream"]) == 0
    want, _ = _greedy_text(cfg, params, prompt)
    assert capsys.readouterr().out.rstrip("\n") == prompt + want
