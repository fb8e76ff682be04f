"""The grain pipeline: packing layout, sharding, determinism, exact resume (plain and through an
Orbax CheckpointManager), malformed records, startup errors, ArrayRecord, chat SFT masks, FIM."""

import json
import logging
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from loopcoder_jax.config import ConfigError, DataConfig, build_dataclass
from loopcoder_jax.data import pipeline
from loopcoder_jax.data.pipeline import DataError, make_train_iterator
from loopcoder_jax.data.tokenizer import apply_chat_template, load_tokenizer

T = 64  # seq_len of most tests: documents below are 5..~300 tokens, so many get split


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        body = "".join(f"    x_{j} = {j} * {i}\n" for j in range(int(rng.integers(0, 40))))
        docs.append(f"def doc_{i}():\n{body}    return {i}\n")
    return docs


def _write_jsonl(path, records, raw_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = _docs()
    return _write_jsonl(d / "docs.jsonl", [{"text": t} for t in docs]), docs


def _take(it, n):
    return [next(it) for _ in range(n)]


def _stream_docs(batches, tok):
    """Real tokens of all rows in order, split where a BOS starts a document -> texts."""
    stream = []
    for b in batches:
        for row_ids, row_seg in zip(b["input_ids"], b["segment_ids"], strict=True):
            stream += row_ids[row_seg > 0].tolist()
    bounds = [i for i, t in enumerate(stream) if t == tok.bos_id] + [len(stream)]
    return [tok.decode(stream[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _one_epoch(cfg, tok, seq_len=T, **kw):
    cfg = cfg.replace(num_epochs=cfg.num_epochs or 1)
    it = make_train_iterator(cfg, tokenizer=tok, seq_len=seq_len, batch_size=1, **kw)
    return list(it), it


def test_batch_layout_and_packing_invariants(corpus, tok):
    path, docs = corpus
    cfg = DataConfig(sources=(path,), shuffle=False)
    batches, _ = _one_epoch(cfg, tok)
    for key, dtype in [("input_ids", np.int32), ("targets", np.int32), ("segment_ids", np.int32)]:
        assert batches[0][key].dtype == dtype and batches[0][key].shape == (1, T)
    assert batches[0]["positions"].dtype == np.int32
    assert batches[0]["loss_mask"].dtype == np.float32
    # Everything, in order, exactly once: no token lost or duplicated across row splits.
    assert _stream_docs(batches, tok) == docs
    expected = [tok.encode(d, add_eos=True) for d in docs]
    flat_targets, flat_mask, flat_ids = [], [], []
    for b in batches:
        ids, tgt, seg, pos, mask = (b[k][0] for k in pipeline.BATCH_KEYS)
        real = seg > 0
        # padding only at the end of a row, with mask 0 and pad ids
        assert np.all(np.diff(real.astype(int)) <= 0)
        assert np.all(mask[~real] == 0) and np.all(ids[~real] == tok.pad_id)
        # segments number 1, 2, ... and positions restart at every segment start
        starts = np.flatnonzero(real & np.concatenate([[True], seg[1:] != seg[:-1]]))
        assert seg[starts].tolist() == list(range(1, len(starts) + 1))
        for a, z in zip(starts, list(starts[1:]) + [int(real.sum())], strict=True):
            assert pos[a:z].tolist() == list(range(z - a))
        # within a segment the target is the next input token
        same = real[:-1] & (seg[1:] == seg[:-1])
        assert np.array_equal(tgt[:-1][same], ids[1:][same])
        flat_ids += ids[real].tolist()
        flat_targets += tgt[real].tolist()
        flat_mask += mask[real].tolist()
    # Targets across row boundaries too: each document's targets are its ids shifted by one,
    # and exactly its last token is not trained on.
    at = 0
    for ids in expected:
        n = len(ids)
        assert flat_ids[at : at + n] == ids
        assert flat_targets[at : at + n - 1] == ids[1:]
        assert flat_mask[at : at + n] == [1.0] * (n - 1) + [0.0]
        at += n
    assert at == len(flat_ids)
    assert any(int(b["segment_ids"].max()) > 1 for b in batches)  # rows do hold several docs


def test_long_only_keeps_fitting_documents_whole(corpus, tok):
    path, docs = corpus
    cfg = DataConfig(sources=(path,), shuffle=False, split_long="long_only")
    batches, _ = _one_epoch(cfg, tok)
    assert _stream_docs(batches, tok) == docs
    segments = []
    for b in batches:
        seg, ids = b["segment_ids"][0], b["input_ids"][0]
        segments += [ids[seg == s].tolist() for s in range(1, int(seg.max()) + 1)]
    encoded = [tok.encode(d, add_eos=True) for d in docs]
    assert any(len(e) > T for e in encoded) and any(len(e) <= T for e in encoded)
    for e in encoded:
        if len(e) <= T:
            assert e in segments  # whole, in one row
        else:
            assert e not in segments  # longer than a row: split
    assert len(segments) < len(_one_epoch(cfg.replace(split_long="always"), tok)[0]) * 8


def test_sharding_disjoint_and_covering(corpus, tok):
    path, docs = corpus
    cfg = DataConfig(sources=(path,), seed=3)
    seen = []
    for p in range(3):
        batches, _ = _one_epoch(cfg, tok, process_index=p, process_count=3)
        seen.append(_stream_docs(batches, tok))
    assert sum(len(s) for s in seen) == len(docs)
    assert sorted(sum(seen, [])) == sorted(docs)
    assert all(set(a).isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    with pytest.raises(DataError, match="no records"):
        make_train_iterator(cfg, tokenizer=tok, seq_len=T, batch_size=1, process_count=100)


def test_deterministic_by_seed_and_reshuffled_per_epoch(corpus, tok):
    path, docs = corpus
    cfg = DataConfig(sources=(path,))

    def first(seed, n=6):
        it = make_train_iterator(cfg, tokenizer=tok, seq_len=T, batch_size=4, seed=seed)
        return np.stack([b["input_ids"] for b in _take(it, n)])

    assert np.array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))
    # data.seed overrides the train seed
    fixed = cfg.replace(seed=1)
    a = make_train_iterator(fixed, tokenizer=tok, seq_len=T, batch_size=4, seed=7)
    assert np.array_equal(np.stack([b["input_ids"] for b in _take(a, 6)]), first(1))
    batches, _ = _one_epoch(cfg.replace(num_epochs=2), tok)
    both = _stream_docs(batches, tok)
    assert sorted(both[: len(docs)]) == sorted(docs) and both[: len(docs)] != docs
    assert both[len(docs) :] != both[: len(docs)] and sorted(both[len(docs) :]) == sorted(docs)


@pytest.mark.parametrize("skip", [0, 1, 5, 13])
def test_resume_continues_at_exactly_the_next_batch(corpus, tok, skip):
    path, _ = corpus
    cfg = DataConfig(sources=(path,), fim_rate=0.3)
    make = lambda: make_train_iterator(cfg, tokenizer=tok, seq_len=T, batch_size=3, seed=5)
    it = make()
    _take(it, skip)
    state = json.loads(json.dumps(pipeline.iterator_state(it)))  # survives JSON
    expected = _take(it, 6)
    fresh = make()
    pipeline.restore_iterator_state(fresh, state)
    for want, got in zip(expected, _take(fresh, 6), strict=True):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(want[k], got[k])


def test_resume_through_orbax_checkpoint_manager(corpus, tok, tmp_path):
    path, _ = corpus
    cfg = DataConfig(sources=(path,))
    make = lambda: make_train_iterator(cfg, tokenizer=tok, seq_len=T, batch_size=2, seed=1)
    it = make()
    _take(it, 7)
    params = {"w": np.arange(4.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(
            7,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(params), data=pipeline.orbax_save_args(it)
            ),
        )
        mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(params), data=pipeline.orbax_restore_args(fresh)
            ),
        )
    np.testing.assert_array_equal(restored["state"]["w"], params["w"])
    for want, got in zip(expected, _take(fresh, 3), strict=True):
        np.testing.assert_array_equal(want["input_ids"], got["input_ids"])
        np.testing.assert_array_equal(want["segment_ids"], got["segment_ids"])


def test_malformed_records_counted_with_file_and_line(tmp_path, tok, caplog):
    good = _docs(6)
    bad_lines = [
        b"{not json",
        b'{"txt": "wrong key"}',
        b'{"text": 42}',
        b'{"text": "   "}',
        b'{"text": "caf\xe9"}',  # latin-1, not UTF-8
        b'["a", "list"]',
    ]
    path = tmp_path / "mixed.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"text": good[0]}).encode() + b"\n\n")  # a blank line is no record
        for i, line in enumerate(bad_lines):
            f.write(line + b"\n" + json.dumps({"text": good[i % 5 + 1]}).encode() + b"\n")
    cfg = DataConfig(sources=(str(path),), shuffle=False)
    with caplog.at_level(logging.WARNING, logger="loopcoder_jax.data.pipeline"):
        batches, it = _one_epoch(cfg, tok)
    stats = pipeline.data_stats(it)
    assert stats.records_bad == len(bad_lines) and stats.records_ok == len(bad_lines) + 1
    # line numbers count the blank line: bad records sit on lines 3, 5, 7, ...
    where = [(p, ln) for p, ln, _ in stats.examples]
    assert where == [(str(path), 3 + 2 * i) for i in range(pipeline.MAX_REPORTED)]
    reasons = [r for _, _, r in stats.examples]
    kinds = ["invalid JSON", "missing field", "wrong type", "empty text", "not valid UTF-8"]
    for want, got in zip(kinds, reasons, strict=True):
        assert got.startswith(want)
    assert stats.reasons["not valid UTF-8"] == 1 and stats.reasons["not a JSON object"] == 1
    # The log names the first few records as they are met (parse threads may reorder them).
    logged = re.findall(r"skipped malformed record .*:(\d+): ", caplog.text)
    assert len(logged) == pipeline.MAX_REPORTED
    assert {int(n) for n in logged} <= {3 + 2 * i for i in range(len(bad_lines))}
    assert f"{path}:3: invalid JSON" in stats.summary()
    assert "6 of 13 records skipped" in stats.summary()
    assert len(_stream_docs(batches, tok)) == len(bad_lines) + 1  # every good record trained


def test_reported_examples_do_not_depend_on_arrival_order():
    lines = list(range(1, 2 * pipeline.MAX_REPORTED + 1))
    reports = []
    for order in (lines, lines[::-1], lines[1::2] + lines[::2]):
        stats = pipeline.DataStats(quiet=True)
        for ln in order:
            stats.bad("a.jsonl", ln, "invalid JSON: x")
        reports.append(stats.examples)
    assert reports[0] == reports[1] == reports[2]
    assert [ln for _, ln, _ in reports[0]] == lines[: pipeline.MAX_REPORTED]


def test_startup_errors_name_the_path_and_fix(tmp_path, tok):
    kw = dict(tokenizer=tok, seq_len=T, batch_size=2)
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist.*data\.sources"):
        make_train_iterator(DataConfig(sources=(str(tmp_path / "missing.jsonl"),)), **kw)
    with pytest.raises(DataError, match="matches no file"):
        make_train_iterator(DataConfig(sources=(str(tmp_path / "none*.jsonl"),)), **kw)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown extension"):
        make_train_iterator(DataConfig(sources=(str(tmp_path / "data.csv"),)), **kw)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="hold no records"):
        make_train_iterator(DataConfig(sources=(str(tmp_path / "empty.jsonl"),)), **kw)
    all_bad = _write_jsonl(tmp_path / "bad.jsonl", [{"content": "x"}] * 3, [b"{oops"])
    with pytest.raises(DataError, match=r"bad\.jsonl is usable.*line 1: missing field.*text_field"):
        make_train_iterator(DataConfig(sources=(all_bad,)), **kw)
    # Wrong field name configured: the same early error, not an endless empty stream.
    ok = _write_jsonl(tmp_path / "ok.jsonl", [{"text": "x = 1"}])
    with pytest.raises(DataError, match="none of the first 1 records"):
        make_train_iterator(DataConfig(sources=(ok,), text_field="body"), **kw)


def test_array_record_source_mixed_with_jsonl(tmp_path, tok, corpus):
    path, docs = corpus
    ar_docs = _docs(5, seed=9)
    ar_path = str(tmp_path / "part.array_record")
    writer = ArrayRecordWriter(ar_path, "group_size:1")
    for d in ar_docs:
        writer.write(json.dumps({"text": d}).encode())
    writer.write(b"\xff\xfe")  # record index 5: not UTF-8
    writer.close()
    cfg = DataConfig(sources=(path, ar_path), shuffle=False)
    batches, it = _one_epoch(cfg, tok)
    assert _stream_docs(batches, tok) == docs + ar_docs
    assert pipeline.data_stats(it).examples == [
        (ar_path, 5, "not valid UTF-8: invalid start byte at byte 0")
    ]
    (tmp_path / "fake.array_record").write_bytes(b"not an array record")
    with pytest.raises(DataError, match="not a readable ArrayRecord"):
        make_train_iterator(
            DataConfig(sources=(str(tmp_path / "fake.array_record"),)),
            tokenizer=tok,
            seq_len=T,
            batch_size=1,
        )


def test_chat_sft_trains_only_on_assistant_tokens(tmp_path, tok):
    conversations = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Write fib."},
            {"role": "assistant", "content": "def fib(n):\n    return n"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]
    path = _write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": c} for c in conversations]
        + [{"messages": [{"role": "user", "content": "no answer"}]}, {"messages": "x"}],
    )
    cfg = DataConfig(sources=(path,), shuffle=False, split_long="long_only")
    batches, it = _one_epoch(cfg, tok, seq_len=128)
    assert pipeline.data_stats(it).reasons == {"no assistant turn": 1, "wrong type": 1}
    end = tok.special_ids["<|im_end|>"]
    segments = []  # (ids, targets, mask) of every segment; long_only keeps conversations whole
    for b in batches:
        seg = b["segment_ids"][0]
        assert np.all(b["loss_mask"][0][seg == 0] == 0)
        for s in range(1, int(seg.max()) + 1):
            segments.append([b[k][0][seg == s] for k in ("input_ids", "targets", "loss_mask")])
    assert len(segments) == len(conversations)
    for (ids, tgt, mask), conv in zip(segments, conversations, strict=True):
        assert tok.decode(ids) == apply_chat_template(conv, add_generation_prompt=False)
        want = []
        for m in conv:
            if m["role"] == "assistant":
                want += tok.encode(m["content"], add_bos=False) + [end]
        assert tgt[mask == 1].tolist() == want


def test_chat_format_forced_and_auto(tmp_path, tok):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "x = 1\n"}] * 3)
    with pytest.raises(DataError, match="none of the first"):
        make_train_iterator(
            DataConfig(sources=(path,), record_format="chat"),
            tokenizer=tok,
            seq_len=T,
            batch_size=1,
        )


def test_fim_rewrites_documents(corpus, tok):
    path, docs = corpus
    cfg = DataConfig(sources=(path,), shuffle=False, fim_rate=1.0, seed=0)
    batches, _ = _one_epoch(cfg, tok)
    sp = tok.special_ids
    texts = _stream_docs(batches, tok)
    assert len(texts) == len(docs)
    for text, doc in zip(texts, docs, strict=True):
        assert text.startswith("<|fim_prefix|>") and text.endswith("<|im_end|>")
        pre, rest = text[len("<|fim_prefix|>") :].split("<|fim_suffix|>")
        suf, mid = rest.split("<|fim_middle|>")
        assert pre + mid[: -len("<|im_end|>")] + suf == doc
    assert sum(int((b["input_ids"] == sp["<|fim_middle|>"]).sum()) for b in batches) == len(docs)


def test_shipped_default_corpus(tok):
    it = make_train_iterator(DataConfig(), tokenizer=tok, seq_len=128, batch_size=8)
    b = next(it)
    assert b["input_ids"].shape == (8, 128)
    assert pipeline.describe_batch(b)["real_fraction"] == 1.0  # concat-and-split: no padding
    assert int(b["input_ids"].max()) < tok.vocab_size
    assert pipeline.data_stats(it).records_bad == 0


def test_data_config_from_yaml_section():
    cfg = build_dataclass(DataConfig, {"sources": ["a.jsonl", "b/*.jsonl"], "seed": 3}, "data")
    assert cfg.sources == ("a.jsonl", "b/*.jsonl") and cfg.seed == 3
    assert DataConfig(sources="one.jsonl").sources == ("one.jsonl",)
    with pytest.raises(ConfigError, match="record_format"):
        DataConfig(record_format="xml")
    with pytest.raises(ConfigError, match="split_long"):
        DataConfig(split_long="never")
    with pytest.raises(ConfigError, match="Unknown keys"):
        build_dataclass(DataConfig, {"source": ["a.jsonl"]}, "data")


def test_iterator_is_a_grain_iterator(corpus, tok):
    it = make_train_iterator(
        DataConfig(sources=(corpus[0],)), tokenizer=tok, seq_len=T, batch_size=2
    )
    assert isinstance(it, grain.DatasetIterator)


def test_jsonl_index_edge_cases(tmp_path):
    path = tmp_path / "edge.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n\n{"text": "b"}\n  \n{"text": "c"}')  # CRLF, no final \n
    for chunk in (3, 1 << 20):  # newline search across read-chunk boundaries
        f = pipeline._JsonlFile(str(path), chunk_bytes=chunk)
        rows = [f.read(i) for i in range(len(f))]
        assert [ln for _, ln in rows] == [1, 3, 4, 5]
        assert [json.loads(r) if r.strip() else None for r, _ in rows] == [
            {"text": "a"},
            {"text": "b"},
            None,  # a line of spaces is a record, reported as malformed
            {"text": "c"},
        ]


def test_worker_processes_give_the_same_batches_and_resume(corpus, tok):
    path, _ = corpus
    cfg = DataConfig(sources=(path,), worker_count=1)
    kw = dict(tokenizer=tok, seq_len=T, batch_size=2, seed=4)
    inproc = make_train_iterator(cfg.replace(worker_count=0), **kw)
    expected = _take(inproc, 6)
    it = make_train_iterator(cfg, **kw)
    try:
        got = _take(it, 3)
        state = json.loads(json.dumps(pipeline.iterator_state(it)))
    finally:
        it.close()
    fresh = make_train_iterator(cfg, **kw)
    try:
        pipeline.restore_iterator_state(fresh, state)
        got += _take(fresh, 3)
    finally:
        fresh.close()
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want["input_ids"], have["input_ids"])


def test_preview_cli(corpus, tmp_path, capsys):
    assert pipeline.main(["--sources", corpus[0], "--seq-len", "32", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert '"real_fraction": 1.0' in out and "def doc_" in out and '"records_bad": 0' in out
    assert pipeline.main(["--sources", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_restoring_a_state_of_another_stream_is_a_clear_error(corpus, tok):
    path, _ = corpus
    cfg = DataConfig(sources=(path,))
    it = make_train_iterator(cfg, tokenizer=tok, seq_len=T, batch_size=2, seed=1)
    _take(it, 2)
    state = pipeline.iterator_state(it)
    other = make_train_iterator(cfg, tokenizer=tok, seq_len=T, batch_size=2, seed=2)
    with pytest.raises(DataError, match="different record stream.*seed=1"):
        pipeline.restore_iterator_state(other, state)
    sharded = make_train_iterator(
        cfg, tokenizer=tok, seq_len=T, batch_size=2, seed=1, process_count=2
    )
    with pytest.raises(DataError, match="process count"):
        pipeline.restore_iterator_state(sharded, state)
    # A different row shape may resume the same stream (a position is record + token offset).
    longer = make_train_iterator(cfg, tokenizer=tok, seq_len=2 * T, batch_size=1, seed=1)
    pipeline.restore_iterator_state(longer, state)
    row = next(longer)["input_ids"][0]
    np.testing.assert_array_equal(row[:T], next(it)["input_ids"][0])
