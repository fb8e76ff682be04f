"""Tokenizer: shipped model ids, special tokens as single ids, round trips, chat template,
training (API + CLI), and that the shipped assets are exactly what build_assets generates."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from loopcoder_jax.config import preset
from loopcoder_jax.data import build_assets
from loopcoder_jax.data.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    apply_chat_template,
    load_tokenizer,
    shipped_model_path,
    train_tokenizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = 'def add(a, b):\n    """Sum."""\n\treturn a + b  # ok\r\n\nx = [i * 2 for i in range(10)]\n'


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _assert_specials_single_ids(t):
    ids = []
    for token in SPECIAL_TOKENS:
        assert token in t.special_ids, token
        i = t.special_ids[token]
        assert t.encode(token, add_bos=False) == [i], token
        assert t.id_to_piece(i) == token
        # Inside text too: the template relies on it.
        assert i in t.encode(f"x = 1{token}y = 2", add_bos=False)
        ids.append(i)
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert {t.unk_id, t.bos_id, t.eos_id, t.pad_id}.isdisjoint(ids)


def test_shipped_tokenizer_matches_tiny_preset(tok):
    assert tok.vocab_size == 512 == preset("tiny").vocab_size
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    _assert_specials_single_ids(tok)
    assert tok.special_ids["<|fim_prefix|>"] == 4  # reserved right after the control ids
    assert tok.stop_ids == (2, tok.special_ids["<|im_end|>"], tok.special_ids["<|endoftext|>"])


def test_encode_adds_bos_not_eos_and_round_trips(tok):
    ids = tok.encode(CODE)
    assert ids[0] == tok.bos_id and ids[-1] != tok.eos_id
    assert tok.encode(CODE, add_bos=False, add_eos=True)[-1] == tok.eos_id
    assert tok.decode(ids) == CODE
    ascii_all = "".join(chr(c) for c in range(32, 127)) + "\t\n\r\n"
    assert tok.decode(tok.encode(ascii_all)) == ascii_all
    # Code compresses: the corpus-trained pieces are used (not one id per character).
    assert len(tok.encode(CODE, add_bos=False)) < 0.6 * len(CODE)
    assert tok.encode_batch([CODE, "x"]) == [ids[1:], tok.encode("x", add_bos=False)]


def test_load_tokenizer_accepts_dir_and_errors_clearly(tmp_path, tok):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(open(shipped_model_path(), "rb").read())
    assert load_tokenizer(run).encode(CODE) == tok.encode(CODE)
    with pytest.raises(TokenizerError, match="does not exist.*train"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")


def test_chat_template_chatml(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 1 and 2."},
        {"role": "assistant", "content": "3"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nAdd 1 and 2.<|im_end|>\n"
        "<|im_start|>assistant\n3<|im_end|>\n"
    )
    assert apply_chat_template(messages, add_generation_prompt=False) == expected
    prompt = tok.apply_chat_template(messages[:2])
    assert prompt.endswith("<|im_start|>user\nAdd 1 and 2.<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    start, end = tok.special_ids["<|im_start|>"], tok.special_ids["<|im_end|>"]
    assert ids.count(start) == 3 and ids.count(end) == 2
    assert tok.decode(ids) == prompt
    with pytest.raises(ValueError, match="message 0"):
        apply_chat_template([{"role": "user"}])


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    docs = build_assets.generate_corpus(seed=3, target_bytes=60_000)
    docs.append("naïve café — ünïcode ✓")
    with open(d / "a.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
        f.write("{broken json\n")  # skipped, not fatal
    (d / "b.txt").write_text(CODE * 20)
    return d


def test_train_tokenizer_reserves_specials_and_is_deterministic(train_inputs, tmp_path):
    inputs = [str(train_inputs / "*.jsonl"), str(train_inputs / "b.txt")]
    path = train_tokenizer(
        inputs, 400, str(tmp_path / "one" / "tok"), extra_special_tokens=["<|x|>"]
    )
    again = train_tokenizer(
        inputs, 400, str(tmp_path / "two" / "tok"), extra_special_tokens=["<|x|>"]
    )
    assert open(path, "rb").read() == open(again, "rb").read()
    assert os.path.exists(tmp_path / "one" / "tok.vocab")
    t = load_tokenizer(path)
    assert t.vocab_size == 400
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, 3)
    _assert_specials_single_ids(t)
    assert t.sp.PieceToId("<|x|>") == 4 + len(SPECIAL_TOKENS)
    # Byte fallback (the default): text outside the training characters round-trips exactly.
    text = "emoji 🙂 and 中文 and naïve\ttabs"
    assert t.decode(t.encode(text)) == text and t.unk_id not in t.encode(text)


def test_train_tokenizer_errors(train_inputs, tmp_path):
    with pytest.raises(TokenizerError, match="no room"):
        train_tokenizer([str(train_inputs / "b.txt")], 200, str(tmp_path / "t"))
    with pytest.raises(TokenizerError, match="matches no file"):
        train_tokenizer([str(tmp_path / "nope*.jsonl")], 400, str(tmp_path / "t"))


def test_tokenizer_cli_train(train_inputs, tmp_path):
    out = tmp_path / "cli" / "tokenizer"
    cmd = [sys.executable, "-m", "loopcoder_jax.data.tokenizer", "train", "--input"]
    cmd += [str(train_inputs / "a.jsonl"), "--vocab-size", "450", "--output", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    t = load_tokenizer(str(out) + ".model")
    assert t.vocab_size == 450
    _assert_specials_single_ids(t)
    bad_cmd = cmd[:5] + [str(tmp_path / "missing.jsonl"), "--vocab-size", "450"]
    bad = subprocess.run(
        bad_cmd + ["--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "matches no file" in bad.stderr


def test_shipped_assets_are_reproducible(tmp_path):
    """The committed corpus/tokenizer are exactly what `build_assets` makes (deterministic)."""
    built = build_assets.build_assets(str(tmp_path))
    assets = os.path.dirname(shipped_model_path())
    for key in ("corpus", "chat", "tokenizer"):
        name = os.path.basename(built[key])
        digest = [
            hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in (built[key], os.path.join(assets, name))
        ]
        assert digest[0] == digest[1], (
            f"{name} differs: rerun python -m loopcoder_jax.data.build_assets"
        )
    total = sum(os.path.getsize(os.path.join(assets, n)) for n in os.listdir(assets))
    assert total < 3 * 2**20


def test_train_tokenizer_vocab_below_characters_is_a_clear_error(train_inputs, tmp_path):
    with pytest.raises(TokenizerError, match="distinct characters"):
        train_tokenizer([str(train_inputs / "a.jsonl")], 300, str(tmp_path / "t"))


def test_foreign_model_without_pad_or_all_specials(tmp_path):
    """A model laid out like other releases (no pad piece, some special tokens at other ids,
    some stored as control pieces) loads the same way: specials found by piece, pad = EOS."""
    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text("\n".join(build_assets.generate_corpus(seed=1, target_bytes=20_000)))
    prefix = str(tmp_path / "foreign")
    spm.SentencePieceTrainer.Train(
        input=str(text),
        model_prefix=prefix,
        vocab_size=300,
        user_defined_symbols=["<|im_end|>", "<|fim_prefix|>"],
        control_symbols=["<|im_start|>", "<|vendor_x|>"],
        pad_id=-1,
        minloglevel=2,
    )
    t = load_tokenizer(prefix + ".model")
    assert t.pad_id == t.eos_id == 2 and t.bos_id == 1
    assert set(t.special_ids) == {"<|im_end|>", "<|fim_prefix|>", "<|im_start|>", "<|vendor_x|>"}
    assert t.encode("a<|im_end|>", add_bos=False)[-1] == t.special_ids["<|im_end|>"]
    # Control pieces are not matched in text by SentencePiece; encode() still gives one id.
    ids = t.encode("<|im_start|>user\nhi<|im_end|>", add_bos=False)
    assert ids[0] == t.special_ids["<|im_start|>"] and ids.count(t.unk_id) == 0
    assert t.decode(ids).startswith("<|im_start|>user") and t.decode(ids).endswith("hi<|im_end|>")
    assert t.encode_batch(["x<|vendor_x|>", "y"])[0][-1] == t.special_ids["<|vendor_x|>"]
    assert t.stop_ids == (t.eos_id, t.special_ids["<|im_end|>"])
    with pytest.raises(TokenizerError, match=re.escape("no single-id '<|repo_name|>'")):
        t.special_id("<|repo_name|>")
