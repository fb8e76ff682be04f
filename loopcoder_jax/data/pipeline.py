"""The grain training pipeline: records -> tokens -> packed fixed-length rows -> batches.

    source (JSONL lines + ArrayRecord records, one global index over all files)
      -> this process's contiguous shard          (disjoint; all shards cover every record)
      -> shuffle(seed), re-shuffled every epoch -> repeat(num_epochs)
      -> parse + tokenize (bad records -> skipped, counted in `DataStats`, first few logged)
      -> pack into rows of seq_len tokens        (`_PackIterDataset`, documents split across rows)
      -> batch(batch_size)                        dicts of numpy [batch_size, seq_len]

Row layout (all [B, T] numpy):
    input_ids   int32    tokens; pad id where segment_ids == 0
    targets     int32    the next token of the same document (pad where unknown)
    segment_ids int32    1, 2, ... per document piece in the row; 0 = padding
    positions   int32    0, 1, ... restarting at every segment (RoPE positions)
    loss_mask   float32  1 where `targets` is a real next token that is trained on: 0 on padding,
                         on the last token of every document, and for chat records everywhere
                         except where the target is assistant content (or its `<|im_end|>`)
A document longer than the room left in a row continues in the next row as a new segment; the
last token of the first piece keeps its real target (the first token of the next piece).

Resume: the iterator is a grain `DatasetIterator`; `iterator_state(it)` is a JSON-able dict and
`restore_iterator_state(it, state)` on a freshly made iterator continues at exactly the next
batch. With Orbax, save it next to the train state as
`ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))` and restore with
`grain.checkpoint.CheckpointRestore(it)` (see `orbax_save_args` / `orbax_restore_args`).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import json
import logging
import os
import threading
from collections.abc import Sequence
from importlib import resources
from typing import Any

import grain
import numpy as np
from absl import flags as absl_flags

from loopcoder_jax.config import DataConfig
from loopcoder_jax.data.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

SHIPPED_CORPUS = "corpus.jsonl"  # inside loopcoder_jax/assets/
JSONL_SUFFIXES = (".jsonl", ".json")
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
MAX_REPORTED = 5  # malformed records logged one by one (file:line); the rest are counted


class DataError(ValueError):
    """The data sources are unusable; raised at startup, naming the path and the fix."""


def shipped_corpus_path() -> str:
    """The small generated code corpus shipped in the package (JSONL `text` records)."""
    return str(resources.files("loopcoder_jax") / "assets" / SHIPPED_CORPUS)


# ---------------------------------------------------------------------------- malformed records
class DataStats:
    """Counts of records read and skipped in this process (thread-safe).

    `examples` holds (path, line, reason) of the `MAX_REPORTED` malformed records that come first
    by (path, line), kept sorted; `line` is the 1-based line of a JSONL file or the 0-based record
    index of an ArrayRecord file. grain parses on several threads, so the order records are seen
    in is not the file order: sorting keeps the report the same from run to run.
    """

    def __init__(self, process_index: int = 0, quiet: bool = False):
        self.process_index = process_index
        self.quiet = quiet
        self.records_ok = 0
        self.records_bad = 0
        self.tokens = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self.examples: list[tuple[str, int, str]] = []
        self._lock = threading.Lock()

    def ok(self, num_tokens: int) -> None:
        with self._lock:
            self.records_ok += 1
            self.tokens += num_tokens

    def bad(self, path: str, line: int, reason: str) -> None:
        with self._lock:
            self.records_bad += 1
            self.reasons[reason.split(":")[0]] += 1
            n = self.records_bad
            bisect.insort(self.examples, (path, line, reason))
            del self.examples[MAX_REPORTED:]
        if self.quiet:
            return
        if n <= MAX_REPORTED:
            log.warning("data: skipped malformed record %s:%d: %s", path, line, reason)
        elif n & (n - 1) == 0:  # powers of two: a growing problem stays visible, logs stay short
            log.warning("data: %s", self.summary())

    def __getstate__(self):  # grain worker processes get their own counters
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def summary(self) -> str:
        with self._lock:
            total = self.records_ok + self.records_bad
            first = "; ".join(f"{p}:{ln}: {r}" for p, ln, r in self.examples)
            return (
                f"process {self.process_index}: {self.records_bad} of {total} records skipped "
                f"as malformed {dict(self.reasons)}" + (f"; first: {first}" if first else "")
            )

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "records_ok": self.records_ok,
                "records_bad": self.records_bad,
                "tokens": self.tokens,
                "reasons": dict(self.reasons),
                "examples": [list(e) for e in self.examples],
            }


# ---------------------------------------------------------------------------- sources
def resolve_sources(patterns: Sequence[str], key: str = "data.sources") -> list[str]:
    """Expands paths/globs (empty = the shipped corpus); a clear `DataError` for a bad one.

    `key` is the config key the patterns come from, named in the error messages.
    """
    if not patterns:
        return [shipped_corpus_path()]
    empty_hint = " (or leave it empty for the shipped corpus)." if key == "data.sources" else "."
    paths: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(
                f"{key} pattern {pattern!r} matches no file. Fix the path/glob in the "
                f"`data:` section (or --set {key}=[...])."
            )
        for path in matches:
            if not os.path.isfile(path):
                raise DataError(
                    f"data source {path} does not exist or is not a file. Fix {key} in "
                    f"the `data:` section{empty_hint}"
                )
            if not path.endswith(JSONL_SUFFIXES + ARRAY_RECORD_SUFFIXES):
                raise DataError(
                    f"data source {path} has an unknown extension; use .jsonl (one JSON object "
                    "per line) or .array_record (one JSON object per record)."
                )
            paths.append(path)
    return paths


class _JsonlFile:
    """Random access to the non-blank lines of a JSONL file through a byte-offset index."""

    def __init__(self, path: str, chunk_bytes: int = 1 << 26):
        self.path = path
        # One pass in bounded memory; the index costs 16 bytes per line. (For very large
        # corpora prefer ArrayRecord: it is indexed natively and needs no scan.)
        ends, size = [], 0
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                ends.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
                size += len(chunk)
                last = chunk[-1]
        ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        if size and last != 10:
            ends = np.append(ends, size)  # last line without a newline
        starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else ends
        # Blank lines are not records (JSONL writers often end with one); a line of spaces is
        # kept and reported as malformed.
        keep = (ends - starts) > 0
        self.line_numbers = np.flatnonzero(keep) + 1  # 1-based, as editors show them
        self.starts = starts[keep]
        self.ends = ends[keep]
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, i: int) -> tuple[bytes, int]:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        # pread: no shared file position, so grain's read threads cannot interleave seeks.
        start, end = int(self.starts[i]), int(self.ends[i])
        return os.pread(self._fd, end - start, start), int(self.line_numbers[i])

    def __getstate__(self):  # worker processes reopen the file
        return {**self.__dict__, "_fd": None}

    def __del__(self, _close=os.close):  # default arg: `os` may be gone at interpreter exit
        if getattr(self, "_fd", None) is not None:
            _close(self._fd)


class _ArrayRecordFile:
    def __init__(self, path: str):
        self.path = path
        try:
            self._source = grain.sources.ArrayRecordDataSource([path])
            self._len = len(self._source)
        except Exception as e:  # the reader raises several types for a non-ArrayRecord file
            raise DataError(
                f"data source {path} is not a readable ArrayRecord file ({e}). Write it with "
                "array_record's ArrayRecordWriter (one JSON object per record), or use .jsonl."
            ) from None

    def __len__(self) -> int:
        return self._len

    def read(self, i: int) -> tuple[bytes, int]:
        return self._source[i], i


class RecordSource(grain.sources.RandomAccessDataSource):
    """All files as one random-access sequence of `(raw bytes, file index, line)` records."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self.files = [
            _ArrayRecordFile(p) if p.endswith(ARRAY_RECORD_SUFFIXES) else _JsonlFile(p)
            for p in self.paths
        ]
        self.offsets = np.cumsum([0] + [len(f) for f in self.files]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> tuple[bytes, int, int]:
        file_index = bisect.bisect_right(self.offsets, index) - 1
        raw, line = self.files[file_index].read(index - self.offsets[file_index])
        return raw, file_index, line

    def __repr__(self) -> str:
        return f"RecordSource({len(self.paths)} files, {len(self)} records)"


# ---------------------------------------------------------------------------- parse + tokenize
class _Malformed(Exception):
    pass


@dataclasses.dataclass
class _Encoder:
    """Raw record -> {"ids", "targets", "mask"} (1-D) or None when malformed (then counted).

    `mask[t]` is 1 when `targets[t]` is trained on. Chat records are tokenized piece by piece
    (header, content, footer), so the assistant/non-assistant boundary is exact and the content
    is tokenized as it is at generation time, after the `<|im_start|>assistant\\n` prompt.
    """

    cfg: DataConfig
    tokenizer_path: str
    paths: list[str]
    stats: DataStats
    _tok: Tokenizer | None = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}  # SentencePiece reloads in worker processes

    @property
    def tok(self) -> Tokenizer:
        if self._tok is None:
            self._tok = Tokenizer(self.tokenizer_path)
        return self._tok

    def __call__(self, record, rng: np.random.Generator | None = None):
        raw, file_index, line = record
        try:
            example = self._encode(raw, rng)
        except _Malformed as e:
            self.stats.bad(self.paths[file_index], line, str(e))
            return None
        self.stats.ok(len(example["ids"]))
        return example

    def _parse(self, raw: bytes) -> dict:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Malformed(f"not valid UTF-8: {e.reason} at byte {e.start}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _Malformed(f"invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise _Malformed(f"not a JSON object: got {type(obj).__name__}")
        return obj

    def _encode(self, raw: bytes, rng) -> dict[str, np.ndarray]:
        obj = self._parse(raw)
        fmt = self.cfg.record_format
        if fmt == "chat" or (fmt == "auto" and self.cfg.messages_field in obj):
            return self._encode_chat(obj)
        return self._encode_text(obj, rng)

    def _encode_text(self, obj: dict, rng) -> dict[str, np.ndarray]:
        field = self.cfg.text_field
        if field not in obj:
            raise _Malformed(f"missing field: no {field!r} (keys: {sorted(obj)[:8]})")
        text = obj[field]
        if not isinstance(text, str):
            raise _Malformed(f"wrong type: {field!r} is {type(text).__name__}, not a string")
        if not text.strip():
            raise _Malformed(f"empty text: {field!r} is blank")
        tok = self.tok
        bos = [tok.bos_id] if self.cfg.add_bos else []
        if rng is not None and rng.random() < self.cfg.fim_rate and len(text) >= 3:
            # File-level FIM (DESIGN.md §4): <|fim_prefix|>pre<|fim_suffix|>suf<|fim_middle|>mid
            # <|im_end|>. Cut points are characters, drawn from the element's own RNG.
            a, b = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
            pre, mid, suf = tok.encode_batch([text[:a], text[a:b], text[b:]])
            sp = tok.special_ids
            ids = [
                *bos,
                tok.special_id("<|fim_prefix|>"),
                *pre,
                sp["<|fim_suffix|>"],
                *suf,
                sp["<|fim_middle|>"],
                *mid,
                sp["<|im_end|>"],
            ]
        else:
            ids = [*bos, *tok.encode(text, add_bos=False, add_eos=self.cfg.add_eos)]
        if len(ids) < 2:
            raise _Malformed("too short: fewer than 2 tokens, nothing to predict")
        ids = np.asarray(ids, np.int32)
        mask = np.ones(len(ids), np.float32)
        return self._finish(ids, mask)

    def _encode_chat(self, obj: dict) -> dict[str, np.ndarray]:
        field = self.cfg.messages_field
        messages = obj.get(field)
        if not isinstance(messages, list) or not messages:
            raise _Malformed(f"wrong type: {field!r} must be a non-empty list of messages")
        tok = self.tok
        if "<|im_start|>" not in tok.special_ids or "<|im_end|>" not in tok.special_ids:
            raise TokenizerError(
                f"{tok.path} has no <|im_start|>/<|im_end|> tokens; chat records need a "
                "tokenizer trained with `python -m loopcoder_jax.data.tokenizer train`."
            )
        texts, trained = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _Malformed(f"wrong type: message {i} is {type(m).__name__}, not an object")
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise _Malformed(f"bad role: message {i} has role {role!r}")
            if not isinstance(content, str):
                raise _Malformed(f"wrong type: message {i} content is {type(content).__name__}")
            assistant = role == "assistant"
            texts += [f"{role}\n", content, "\n"]
            trained += [False, assistant, False]
        if not any(t and c.strip() for t, c in zip(trained, texts, strict=True)):
            raise _Malformed("no assistant turn: nothing to train on")
        pieces = tok.encode_batch(texts)
        start, end = tok.special_ids["<|im_start|>"], tok.special_ids["<|im_end|>"]
        ids: list[int] = [tok.bos_id] if self.cfg.add_bos else []
        flags: list[bool] = [False] * len(ids)  # flag[t]: token t is a trained target
        for k in range(0, len(pieces), 3):
            assistant = trained[k + 1]
            header, content, newline = pieces[k], pieces[k + 1], pieces[k + 2]
            ids += [start, *header]
            flags += [False] * (1 + len(header))
            ids += [*content, end]  # the model learns to close its own turn
            flags += [assistant] * (len(content) + 1)
            ids += newline
            flags += [False] * len(newline)
        ids = np.asarray(ids, np.int32)
        # loss at position t predicts token t + 1: it counts when that token is trained.
        mask = np.zeros(len(ids), np.float32)
        mask[:-1] = np.asarray(flags[1:], np.float32)
        return self._finish(ids, mask)

    def _finish(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        targets = np.empty_like(ids)
        targets[:-1] = ids[1:]
        targets[-1] = self.tok.pad_id
        mask[-1] = 0.0  # the last token of a document has no next token
        return {"ids": ids, "targets": targets, "mask": mask}


# ---------------------------------------------------------------------------- packing
class _PackIterator(grain.DatasetIterator):
    """Fills rows of `seq_len` tokens from a stream of encoded documents.

    State = (parent state before the document being split, tokens of it already emitted), so a
    restore re-reads that one document and skips its emitted tokens: exact, and tiny to save.
    """

    def __init__(self, parent, seq_len: int, pad_id: int, split_long: str, stream_id: str):
        super().__init__(parent)
        self._stream_id = stream_id
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._split_long = split_long
        self._carry: dict[str, np.ndarray] | None = None  # document being emitted
        self._carry_state: Any = None  # parent state before `_carry` was read
        self._offset = 0

    def __next__(self) -> dict[str, np.ndarray]:
        T = self._seq_len
        row = {
            "input_ids": np.full(T, self._pad_id, np.int32),
            "targets": np.full(T, self._pad_id, np.int32),
            "segment_ids": np.zeros(T, np.int32),
            "positions": np.zeros(T, np.int32),
            "loss_mask": np.zeros(T, np.float32),
        }
        fill, segment = 0, 0
        while fill < T:
            if self._carry is None:
                state = self._parent.get_state()
                try:
                    doc = next(self._parent)
                except StopIteration:
                    if fill == 0:
                        raise
                    break  # the data ran out: pad the last row
                self._carry, self._carry_state, self._offset = doc, state, 0
            doc = self._carry
            left = len(doc["ids"]) - self._offset
            if left > T - fill and fill > 0 and self._split_long == "long_only" and left <= T:
                break  # it fits whole in a fresh row: pad this one instead of splitting
            take = min(left, T - fill)
            piece = slice(self._offset, self._offset + take)
            segment += 1
            row["input_ids"][fill : fill + take] = doc["ids"][piece]
            row["targets"][fill : fill + take] = doc["targets"][piece]
            row["loss_mask"][fill : fill + take] = doc["mask"][piece]
            row["segment_ids"][fill : fill + take] = segment
            row["positions"][fill : fill + take] = np.arange(take, dtype=np.int32)
            fill += take
            self._offset += take
            if self._offset == len(doc["ids"]):
                self._carry = None
        return row

    def get_state(self) -> dict[str, Any]:
        if self._carry is None:
            state = {"parent": self._parent.get_state(), "offset": 0, "pending": False}
        else:
            state = {"parent": self._carry_state, "offset": self._offset, "pending": True}
        return {**state, "stream": self._stream_id}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("stream", self._stream_id)
        if saved != self._stream_id:
            raise DataError(
                f"The data-iterator state was saved for a different record stream ({saved}) "
                f"than this one ({self._stream_id}): the data, the process layout or the data "
                "seed/shuffle/tokenizer changed, so its position means other records here. "
                "Restore with the same data config and process count, or start a new run."
            )
        self._parent.set_state(state["parent"])
        self._carry, self._offset = None, 0
        if state["pending"]:
            self._carry_state = state["parent"]
            self._carry = next(self._parent)
            self._offset = int(state["offset"])


class _PackIterDataset(grain.IterDataset):
    def __init__(self, parent, seq_len: int, pad_id: int, split_long: str, stream_id: str):
        super().__init__(parent)
        self._args = (seq_len, pad_id, split_long, stream_id)
        self._seq_len, self._split_long = seq_len, split_long

    def __iter__(self) -> _PackIterator:
        return _PackIterator(iter(self._parent), *self._args)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, split_long={self._split_long})"


# ---------------------------------------------------------------------------- entry point
def _startup_check(cfg: DataConfig, source: RecordSource, encoder: _Encoder) -> None:
    """Reads the first records of every file: a wrong path, field or format fails here."""
    if len(source) == 0:
        raise DataError(
            f"data sources {source.paths} hold no records (empty files). Point data.sources at "
            "JSONL/ArrayRecord files with one JSON object per line/record."
        )
    if cfg.startup_check_records == 0:
        return
    # Many-file corpora: fewer records per file, but always enough to see a broken file.
    per_file = max(
        min(16, cfg.startup_check_records), cfg.startup_check_records // len(source.files)
    )
    for file_index, f in enumerate(source.files):
        if len(f) == 0:
            log.warning("data: %s holds no records; it is ignored.", f.path)
            continue
        n = min(len(f), per_file)
        probe = dataclasses.replace(encoder, stats=DataStats(quiet=True))
        base = source.offsets[file_index]
        good = sum(probe(source[base + i]) is not None for i in range(n))
        if good == 0:
            first = "; ".join(f"line {ln}: {r}" for _, ln, r in probe.stats.examples[:3])
            raise DataError(
                f"none of the first {n} records of {f.path} is usable ({first}). Check "
                f"the format: JSON objects with a string {cfg.text_field!r} field, or a "
                f"{cfg.messages_field!r} list of {{role, content}} messages (set "
                "data.text_field / data.messages_field / data.record_format to match)."
            )


def make_train_iterator(
    data_cfg: DataConfig,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
):
    """The training iterator of this process: packed batches, dicts of numpy [batch_size, seq_len].

    Keys and meaning: see the module docstring (`BATCH_KEYS`). `batch_size` is per process.
    Each process reads only its contiguous shard of the records; shuffling is per epoch and
    deterministic given the seed (`data_cfg.seed`, or `seed` when that is None) and the process
    layout. Sources are checked before the first batch (`DataError` names the file and the fix);
    malformed records met later are skipped and counted in `data_stats(it)`. State:
    `iterator_state` / `restore_iterator_state`, or the grain Orbax args.
    With `data_cfg.eval_fraction` > 0 the held-out records (`held_out_indices`) are left out.
    """
    return _make_iterator(
        data_cfg,
        "train",
        tokenizer=tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
    )


def has_eval_data(data_cfg: DataConfig) -> bool:
    """True when the config names held-out data (eval_sources, or an eval_fraction > 0)."""
    return bool(data_cfg.eval_sources) or data_cfg.eval_fraction > 0


def make_eval_iterator(
    data_cfg: DataConfig,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """One pass, in file order, over the held-out records: packed batches like the training ones.

    The records are `data_cfg.eval_sources`, or the `eval_fraction` of the training records that
    `make_train_iterator` leaves out. No shuffling, one epoch, the last batch may be short (and its
    last row padded): the eval set is the same for every run of the same data.
    """
    if not has_eval_data(data_cfg):
        raise DataError("No eval data: set data.eval_sources or data.eval_fraction.")
    return _make_iterator(
        data_cfg.replace(shuffle=False, num_epochs=1),
        "eval",
        tokenizer=tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=0,
    )


def held_out_indices(num_records: int, fraction: float) -> np.ndarray:
    """Sorted indices of the `fraction` of `num_records` records held out for evaluation.

    A fixed permutation (its own seed, not the train or data seed), so every run over the same
    sources holds out the same records; at least one record when fraction > 0, and never all.
    """
    if fraction <= 0 or num_records == 0:
        return np.zeros(0, np.int64)
    k = min(max(1, round(num_records * fraction)), num_records - 1)
    perm = np.random.default_rng(_HELD_OUT_SEED).permutation(num_records)
    return np.sort(perm[:k])


_HELD_OUT_SEED = 20260613  # fixed: the held-out set must not move with the train seed


class _Subset(grain.sources.RandomAccessDataSource):
    """The records of a `RecordSource` at the given indices, in their order."""

    def __init__(self, source: RecordSource, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"_Subset({len(self)} of {self.source!r})"


def _make_iterator(
    data_cfg: DataConfig,
    split: str,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
):
    """The pipeline behind both iterators; `split` is "train" or "eval"."""
    if seq_len < 2 or batch_size < 1:
        raise DataError(f"seq_len={seq_len} must be >= 2 and batch_size={batch_size} >= 1.")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} not in [0, {process_count}).")
    if data_cfg.tokenizer is not None and os.path.abspath(data_cfg.tokenizer) != os.path.abspath(
        tokenizer.path
    ):
        log.warning(
            "data: data.tokenizer=%s differs from the tokenizer passed in (%s); using the latter.",
            data_cfg.tokenizer,
            tokenizer.path,
        )
    eval_files = split == "eval" and bool(data_cfg.eval_sources)
    if eval_files:
        paths = resolve_sources(data_cfg.eval_sources, key="data.eval_sources")
    else:
        paths = resolve_sources(data_cfg.sources)
    source = RecordSource(paths)
    stats = DataStats(process_index)
    encoder = _Encoder(data_cfg, tokenizer.path, paths, stats, _tok=tokenizer)
    _startup_check(data_cfg, source, encoder)
    records = source
    held_out = "" if eval_files else _held_out_tag(data_cfg)
    if held_out:  # the same fixed split for both iterators: eval gets exactly what train lacks
        held = held_out_indices(len(source), data_cfg.eval_fraction)
        keep = held if split == "eval" else np.setdiff1d(np.arange(len(source)), held)
        records = _Subset(source, keep)

    n = len(records)
    start, stop = n * process_index // process_count, n * (process_index + 1) // process_count
    if stop == start:
        raise DataError(
            f"process {process_index} of {process_count} gets no "
            f"{'records' if split == 'train' else 'eval records'}: the sources hold only {n}. "
            "Add data or use fewer processes."
        )
    ds = grain.MapDataset.source(records)[start:stop]
    data_seed = data_cfg.seed if data_cfg.seed is not None else seed
    if data_cfg.shuffle:
        ds = ds.shuffle(seed=data_seed)
    ds = ds.repeat(data_cfg.num_epochs)
    if data_cfg.fim_rate > 0:
        ds = ds.random_map(encoder, seed=data_seed)
    else:
        ds = ds.map(encoder)
    # Malformed records map to None, which the iterator skips. A few read threads keep
    # tokenization ahead of the train step, which runs outside the GIL in XLA.
    read = grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=64)
    it_ds = ds.to_iter_dataset(read)
    # What a saved position refers to: records, this shard, their order, their tokens. (Not
    # seq_len or batch size: a position is a record + token offset, valid for any row shape.)
    stream_id = (
        f"records={len(source)} shard={start}:{stop} "
        f"seed={data_seed if data_cfg.shuffle else 'none'} epochs={data_cfg.num_epochs} "
        f"fim={data_cfg.fim_rate} vocab={tokenizer.vocab_size}{held_out}"
    )
    it_ds = _PackIterDataset(it_ds, seq_len, tokenizer.pad_id, data_cfg.split_long, stream_id)
    it_ds = it_ds.batch(batch_size, drop_remainder=split == "train")
    if data_cfg.worker_count > 0:
        # grain's worker processes read absl flags; a plain `python train.py` never parses
        # them, so take the defaults (what an absl app would do with no flags given).
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    it = iter(it_ds)
    it.data_stats = stats  # counters of this process (of worker processes when worker_count > 0)
    return it


def _held_out_tag(data_cfg: DataConfig) -> str:
    """Part of the stream id: a run with another held-out split reads other records."""
    return f" heldout={data_cfg.eval_fraction}" if data_cfg.eval_fraction > 0 else ""


def data_stats(it) -> DataStats:
    """Malformed-record counters of an iterator made by `make_train_iterator`."""
    return it.data_stats


def iterator_state(it) -> dict[str, Any]:
    """JSON-serialisable state; restoring it continues at exactly the next batch."""
    return it.get_state()


def restore_iterator_state(it, state: dict[str, Any]) -> None:
    """Moves a freshly made iterator (same config and process layout) to a saved state."""
    it.set_state(state)


def orbax_save_args(it):
    """Orbax args to save the iterator inside a CheckpointManager `ocp.args.Composite`."""
    return grain.checkpoint.CheckpointSave(it)


def orbax_restore_args(it):
    """Orbax args that restore the saved state into `it` (a fresh iterator, same config)."""
    return grain.checkpoint.CheckpointRestore(it)


def describe_batch(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Fill statistics of one batch: fraction of real tokens and of trained targets."""
    real = batch["segment_ids"] > 0
    return {
        "real_fraction": float(real.mean()),
        "trained_fraction": float(batch["loss_mask"].mean()),
        "segments_per_row": float(batch["segment_ids"].max(axis=1).mean()),
    }


def build_parser():
    """The `python -m loopcoder_jax.data.pipeline` command line (options show their defaults)."""
    import argparse

    from loopcoder_jax.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="python -m loopcoder_jax.data.pipeline",
        description="Check a data set before training: startup checks, batch fill statistics, "
        "decoded rows, malformed-record counts (docs/data.md).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--sources", nargs="*", default=[],
        help="JSONL / ArrayRecord paths or globs (default: the shipped corpus)",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.model path (default: the shipped one)"
    )
    parser.add_argument(
        "--record-format", default="auto", choices=["auto", "text", "chat"],
        help="record kind (auto: chat when the record has 'messages')",
    )  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    parser.add_argument("--batches", type=int, default=2, help="batches to read")
    parser.add_argument("--show", type=int, default=1, help="rows to print decoded")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m loopcoder_jax.data.pipeline --sources FILES`: check data and show batches."""
    import sys

    from loopcoder_jax.data.tokenizer import load_tokenizer

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cfg = DataConfig(
        sources=tuple(args.sources), tokenizer=args.tokenizer, record_format=args.record_format
    )
    try:
        tok = load_tokenizer(cfg.tokenizer)
        it = make_train_iterator(
            cfg, tokenizer=tok, seq_len=args.seq_len, batch_size=args.batch_size
        )
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i in range(args.batches):
        batch = next(it)
        print(json.dumps({"batch": i, **describe_batch(batch)}))
        for row in range(min(args.show, args.batch_size)):
            seg = batch["segment_ids"][row]
            for s in range(1, int(seg.max()) + 1):
                print(f"--- row {row} segment {s} ---")
                print(tok.decode(batch["input_ids"][row][seg == s]))
    print(json.dumps(data_stats(it).as_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
