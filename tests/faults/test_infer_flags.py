"""infer.py does what docs/inference.md says for bad flags (issue 10, item 7): exit 2 with a
message naming the flag, no traceback, refused before any model is loaded or token generated."""

from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_infer():
    spec = importlib.util.spec_from_file_location("infer_cli", os.path.join(REPO, "infer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


infer = _load_infer()


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: the flags must be refused before that."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded for a request that should be refused")

    monkeypatch.setattr(infer, "load_model", boom)


def _refused(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        infer.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--prompt", ""], "--prompt"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--top-p", "2"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "nan"], "--top-p"),
    ],
)
def test_bad_flags_exit_2_before_loading(flags, needle, no_model, capsys, tmp_path):
    _refused(["--checkpoint", str(tmp_path), *flags], needle, capsys)


def test_output_that_is_an_existing_directory(no_model, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "def f():"}\n')
    argv = ["--checkpoint", str(tmp_path), "--prompts-file", str(src), "--output", str(tmp_path)]
    _refused(argv, "--output", capsys)


def test_empty_prompt_line_in_prompts_file(monkeypatch, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    with pytest.raises(infer.InferError, match="in.jsonl:2.*empty"):
        infer.read_prompts(str(src))
