"""A tokenizer directory loaded the way transformers loads it (issue 14, item 4).

The SentencePiece model is built here with NO special pieces; the HF files add the special
tokens above the piece count, as a release can ship them. Our ids must equal those of
transformers' stock SentencePiece tokenizer (`LlamaTokenizer`, and its converted fast twin),
also right around the special tokens, and the checkpoint's own chat template must render as
transformers renders it.
"""

from __future__ import annotations

import io
import json
from importlib import resources

import pytest
import sentencepiece as spm

from loopcoder_jax.data.chat_template import CHATML_JINJA, ChatTemplateError, chatml, render_chat
from loopcoder_jax.data.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    iter_training_text,
    load_tokenizer,
)

transformers = pytest.importorskip("transformers")

# A template of the release's kind: BOS, a default system turn, ChatML turns.
TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a coder.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim }}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = [
    'def add(a, b):\n    """Sum."""\n    return a + b  # ok\n',
    "<|im_start|>user\nWrite a sort.<|im_end|>\n<|im_start|>assistant\n",
    "x<|im_end|>y <|im_start|> z\n<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "<|im_end|><|im_end|>  <|endoftext|>",
    "html </s> and <s> and <unk> literal",
    "  leading\tand trailing  \n\n",
    "unicode: héllo 日本語 😀 ü",
    "<|im_start|",  # a prefix of a special token is plain text
]


def _train_sp(path: str, dummy_prefix: bool) -> int:
    corpus = str(resources.files("loopcoder_jax") / "assets" / "corpus.jsonl")
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(list(iter_training_text([corpus]))[:200]),
        model_writer=model, vocab_size=420, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).GetPieceSize()


def make_hf_tokenizer_dir(d, dummy_prefix: bool) -> tuple[int, dict[str, int]]:
    """tokenizer.model without special pieces + HF files adding SPECIAL_TOKENS above them, a
    chat template of its own and generation_config.json stop ids. Returns (pieces, specials)."""
    n = _train_sp(str(d / "tokenizer.model"), dummy_prefix)
    specials = {tok: n + k for k, tok in enumerate(SPECIAL_TOKENS)}
    entry = dict(lstrip=False, rstrip=False, normalized=False, single_word=False, special=True)
    decoder = {str(i): {"content": t, **entry} for t, i in specials.items()}
    for i, t in enumerate(["<unk>", "<s>", "</s>"]):
        decoder[str(i)] = {"content": t, **entry}
    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_prefix_space": dummy_prefix,
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "added_tokens_decoder": decoder, "chat_template": TEMPLATE,
        "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
    }  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    stop = [2, specials["<|im_end|>"], specials["<|endoftext|>"]]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    return n, specials


@pytest.fixture(scope="module", params=[False, True], ids=["no-dummy-prefix", "dummy-prefix"])
def hf_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    n, specials = make_hf_tokenizer_dir(d, request.param)
    return d, n, specials


@pytest.fixture(scope="module")
def hf_slow(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir[0]), use_fast=False)


def test_special_tokens_are_added_above_the_pieces(hf_dir):
    d, n, specials = hf_dir
    tok = load_tokenizer(d)
    assert tok.num_pieces == n and tok.vocab_size == n + len(SPECIAL_TOKENS)
    for text, i in specials.items():
        assert tok.encode(text, add_bos=False) == [i] and tok.special_ids[text] == i
        assert tok.decode([5, i, 6]) == tok.decode([5]) + text + tok.decode([6])
        assert tok.id_to_piece(i) == text
    assert tok.stop_ids == (2, specials["<|im_end|>"], specials["<|endoftext|>"])
    # The SentencePiece model alone knows none of them: what loading it used to give.
    bare = Tokenizer(d / "tokenizer.model", hf_files=False)
    assert len(bare.encode("<|im_start|>", add_bos=False)) > 1
    with pytest.raises(TokenizerError, match="no single-id"):
        bare.special_id("<|im_start|>")


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers_stock_sentencepiece_tokenizer(hf_dir, hf_slow, text):
    tok = load_tokenizer(hf_dir[0])
    assert type(hf_slow).__name__ == "LlamaTokenizer"
    ours = tok.encode(text)
    assert ours == hf_slow.encode(text), (text, ours, hf_slow.encode(text))
    assert tok.encode(text, add_bos=False) == hf_slow.encode(text, add_special_tokens=False)
    if "<s>" not in text and "</s>" not in text:
        assert tok.decode(ours) == text


def test_ids_equal_transformers_fast_tokenizer(hf_dir):
    fast = transformers.AutoTokenizer.from_pretrained(str(hf_dir[0]))  # what a user gets
    tok = load_tokenizer(hf_dir[0])
    for text in TEXTS:
        assert tok.encode(text) == fast.encode(text), text


def test_chat_template_renders_as_transformers(hf_dir, hf_slow):
    tok = load_tokenizer(hf_dir[0])
    chats = [
        [{"role": "user", "content": "Write quicksort. "}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "x?"}],
    ]  # fmt: skip
    for msgs in chats:
        for gen in (True, False):
            want = hf_slow.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == want
        ids = hf_slow.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        assert tok.encode_chat(msgs) == list(ids)  # one BOS: the template's own


def test_chatml_jinja_equals_chatml_and_sandbox_holds():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u\nv"}]
    for gen in (True, False):
        assert render_chat(msgs, CHATML_JINJA, gen) == chatml(msgs, gen)
        assert render_chat(msgs, None, gen) == chatml(msgs, gen)
    tagged = (
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    assert render_chat(msgs, tagged) == "su\nv"
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(msgs, hostile)
    with pytest.raises(ChatTemplateError, match="refused"):
        render_chat(msgs, "{{ raise_exception('no system role') }}")


def test_bad_tokenizer_files_are_clear_errors(tmp_path, hf_dir):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((hf_dir[0] / "tokenizer.model").read_bytes())
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="neither a piece"):
        load_tokenizer(d)
