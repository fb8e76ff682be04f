"""Held-out eval data: `data.eval_fraction` leaves a fixed set of records out of training and the
eval iterator reads exactly those; `data.eval_sources` files are read whole, in order."""

import json

import numpy as np
import pytest

from loopcoder_jax.config import ConfigError, DataConfig
from loopcoder_jax.data import pipeline
from loopcoder_jax.data.tokenizer import load_tokenizer

N = 40


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(N):
            f.write(json.dumps({"text": f"def doc_{i}():\n    return {i}\n"}) + "\n")
    return str(path)


def _doc_ids(batches, tok) -> list[int]:
    """The doc numbers of every document in the batches (documents are never split here)."""
    found = []
    for b in batches:
        for ids, seg in zip(b["input_ids"], b["segment_ids"], strict=True):
            for s in range(1, int(seg.max()) + 1):
                text = tok.decode(ids[seg == s])
                found.append(int(text.split("doc_")[1].split("(")[0]))
    return found


def test_eval_fraction_holds_out_a_fixed_set_never_trained_on(docs_file, tok):
    cfg = DataConfig(sources=(docs_file,), eval_fraction=0.25, split_long="long_only")
    held = pipeline.held_out_indices(N, 0.25)
    assert len(held) == 10 and list(held) == sorted(set(held.tolist()))
    # fixed: not a function of the train/data seed
    assert np.array_equal(held, pipeline.held_out_indices(N, 0.25))
    kw = dict(tokenizer=tok, seq_len=64, batch_size=2)
    trained = []
    for p in range(2):  # two processes, three epochs each, two different seeds
        it = pipeline.make_train_iterator(
            cfg.replace(num_epochs=3), process_index=p, process_count=2, seed=p, **kw
        )
        trained += _doc_ids(list(it), tok)
    evaluated = _doc_ids(list(pipeline.make_eval_iterator(cfg, **kw)), tok)
    assert evaluated == held.tolist()  # every held-out record once, in file order
    assert set(trained) == set(range(N)) - set(held.tolist())
    # Without a held-out fraction the same iterator trains on every record.
    plain = pipeline.make_train_iterator(cfg.replace(eval_fraction=0.0, num_epochs=1), **kw)
    assert set(_doc_ids(list(plain), tok)) >= set(held.tolist())


def test_eval_sources_are_read_whole_and_training_is_unchanged(docs_file, tok):
    cfg = DataConfig(sources=(docs_file,), eval_sources=(docs_file,), split_long="long_only")
    kw = dict(tokenizer=tok, seq_len=64, batch_size=3)
    batches = list(pipeline.make_eval_iterator(cfg, **kw))
    assert _doc_ids(batches, tok) == list(range(N))
    assert batches[-1]["input_ids"].shape[0] <= 3  # the short last batch is kept, not dropped
    a = pipeline.make_train_iterator(cfg, **kw)
    b = pipeline.make_train_iterator(cfg.replace(eval_sources=()), **kw)
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_bad_eval_config_is_a_clear_error(docs_file, tmp_path, tok):
    with pytest.raises(ConfigError, match="not both"):
        DataConfig(eval_sources=(docs_file,), eval_fraction=0.1)
    with pytest.raises(ConfigError, match=r"data.eval_fraction=1.0 must lie in \[0, 1\)"):
        DataConfig(eval_fraction=1.0)
    cfg = DataConfig(eval_sources=(str(tmp_path / "nope.jsonl"),))
    with pytest.raises(pipeline.DataError, match="Fix data.eval_sources"):
        pipeline.make_eval_iterator(cfg, tokenizer=tok, seq_len=64, batch_size=1)
