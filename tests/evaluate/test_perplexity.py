"""Perplexity: the CLI's number against a plain numpy computation from full-forward logits."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.data.tokenizer import load_tokenizer
from loopcoder_jax.evaluate.__main__ import main
from loopcoder_jax.model import LoopCoder

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())\n",
    "x = [i * i for i in range(10)]\n",
]
CHAT = {
    "messages": [
        {"role": "user", "content": "Write a function that doubles x."},
        {"role": "assistant", "content": "def double(x):\n    return 2 * x\n"},
    ]
}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_text_perplexity_matches_numpy_reference(tiny_ckpt, tmp_path, capsys):
    cfg, params, path = tiny_ckpt
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    argv = ["--task", "perplexity", "--checkpoint", path, "--data", str(data),
            "--seq-len", "64", "--batch-size", "2", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    got = json.loads((out / "summary.json").read_text())
    assert "perplexity" in capsys.readouterr().out

    tok = load_tokenizer(path)
    # BOS + text + EOS, every next token scored (the training loss). One plain forward over
    # the right-padded records: causal, so padding does not change the positions before it.
    docs = [[tok.bos_id, *tok.encode(t, add_bos=False), tok.eos_id] for t in TEXTS]
    width = max(map(len, docs))
    batch = np.zeros((len(docs), width), np.int32)
    for b, ids in enumerate(docs):
        batch[b, : len(ids)] = ids
    forward = jax.jit(lambda p, x: LoopCoder(cfg).apply({"params": p}, x))
    logp = _log_softmax(np.asarray(forward(params, jnp.asarray(batch)), np.float64))
    nll, count = 0.0, 0
    for b, ids in enumerate(docs):
        nll -= sum(logp[b, t, ids[t + 1]] for t in range(len(ids) - 1))
        count += len(ids) - 1
    assert got["tokens"] == count and got["records"] == 3
    assert got["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_chat_records_score_only_assistant_tokens(tiny_ckpt, tmp_path):
    _, _, path = tiny_ckpt
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(CHAT) + "\n" + "{broken\n")
    out = tmp_path / "out"
    argv = ["--task", "perplexity", "--checkpoint", path, "--data", str(data),
            "--seq-len", "64", "--batch-size", "2", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    got = json.loads((out / "summary.json").read_text())
    tok = load_tokenizer(path)
    answer = CHAT["messages"][1]["content"]
    assert got["tokens"] == len(tok.encode(answer, add_bos=False)) + 1  # + <|im_end|>
    assert got["records"] == 1 and got["records_skipped"] == 1


def test_bad_data_exits_2(tiny_ckpt, tmp_path, capsys):
    _, _, path = tiny_ckpt
    data = tmp_path / "bad.jsonl"
    data.write_text('{"code": "no text field"}\n')
    argv = ["--task", "perplexity", "--checkpoint", path, "--data", str(data)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'text'" in err and "Traceback" not in err
    assert main(["--task", "perplexity", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
