"""SentencePiece tokenizer: loading, the ChatML chat template, and training a new model.

Ids of a model trained here (`train_tokenizer`, and the shipped `assets/tokenizer.model`):
    0 `<unk>`, 1 `<s>` (BOS), 2 `</s>` (EOS), 3 `<pad>`, then `SPECIAL_TOKENS` in order (4, 5, ...)
Every special token is a single id, also when it appears inside text given to `encode`
(SentencePiece `user_defined_symbols`), so `encode(apply_chat_template(...))` produces the
`<|im_start|>` / `<|im_end|>` ids. The released IQuest `tokenizer.model` loads the same way;
`special_ids` then holds the `<|...|>` tokens that model reserves (user-defined or control pieces;
`encode`/`decode` treat both as single ids). A `tokenizer.model` with Hugging Face tokenizer files
beside it (added tokens, special tokens, chat template: `data.hf_tokenizer`) loads as transformers
loads it; chats render with the checkpoint's own template (`data.chat_template`), else ChatML.

CLI:
    python -m loopcoder_jax.data.tokenizer train --input a.jsonl b.txt --vocab-size 32000 \
        --output out/tokenizer          # writes out/tokenizer.model and out/tokenizer.vocab
    python -m loopcoder_jax.data.tokenizer encode --text "def f(x):"   # inspect a model
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from loopcoder_jax.data import hf_tokenizer as hf
from loopcoder_jax.data.chat_template import ChatTemplateError, chatml, render_chat

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# Reserved as single ids after <unk> <s> </s> <pad>, in this order (DESIGN.md §4 formats).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|fim_pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|endoftext|>",
)

_SPECIAL_PIECE = re.compile(r"<\|[^|<>\s]+\|>")
SHIPPED_MODEL = "tokenizer.model"  # inside loopcoder_jax/assets/


class TokenizerError(ValueError):
    """The tokenizer model is missing or unusable; the message names the path and the fix."""


def shipped_model_path() -> str:
    """Path of the tokenizer model shipped in the package (vocab 512, matches preset 'tiny')."""
    return str(resources.files("loopcoder_jax") / "assets" / SHIPPED_MODEL)


class Tokenizer:
    """A SentencePiece model plus the ids the pipeline and the chat template need.

    `encode(text)` adds BOS by default (the released models are trained with it) and never adds
    EOS unless asked. `decode` drops BOS/EOS/pad but keeps the `<|...|>` special tokens, so a
    decoded chat transcript shows its turn markers.

    When the model file is a `tokenizer.model` with Hugging Face tokenizer files beside it
    (`tokenizer_config.json`, `added_tokens.json`, `special_tokens_map.json`,
    `chat_template.jinja`, `generation_config.json`: see `data.hf_tokenizer`), they apply as in
    transformers: added tokens (also above the piece count) and the special tokens are one id
    each in `encode` and decode back to their text, `add_bos_token` / `add_eos_token` set the
    defaults of `encode`, the checkpoint's chat template renders chats, and the generation
    config's EOS ids join `stop_ids`. `hf_files=False` reads the SentencePiece model alone.
    """

    def __init__(self, model_path: str | os.PathLike, *, hf_files: bool = True):
        self.path = os.fspath(model_path)
        if not os.path.isfile(self.path):
            raise TokenizerError(
                f"Tokenizer model {self.path} does not exist. Pass the path of a SentencePiece "
                "`tokenizer.model` (or None for the one shipped in the package), or train one "
                "with `python -m loopcoder_jax.data.tokenizer train --input FILES --vocab-size N "
                "--output PREFIX`."
            )
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(
                f"{self.path} is not a SentencePiece model ({e}); point to a `tokenizer.model`."
            ) from None
        self.num_pieces: int = self.sp.GetPieceSize()
        self.vocab_size: int = self.num_pieces  # grows with added tokens above the pieces
        self.unk_id: int = self.sp.unk_id()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # A model without a pad piece (e.g. the released one) pads with EOS; padded positions
        # carry loss_mask 0 and segment_id 0, so the id itself never trains anything.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.add_bos, self.add_eos = True, False
        self.chat_template: str | None = None  # None: ChatML
        self._extra_stop_ids: tuple[int, ...] = ()
        # Special tokens: every `<|...|>` piece the model reserves (user-defined or control),
        # so a released model's own extras are found by name too.
        self.special_ids: dict[str, int] = {}
        self._text_of: dict[int, str] = {}  # ids decoded as their literal text
        proto = sp_model.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        self.add_dummy_prefix: bool = bool(proto.normalizer_spec.add_dummy_prefix)
        reserved = (proto.SentencePiece.USER_DEFINED, proto.SentencePiece.CONTROL)
        for i, p in enumerate(proto.pieces):
            if p.type in reserved and _SPECIAL_PIECE.fullmatch(p.piece):
                self.special_ids[p.piece] = i
                if p.type == proto.SentencePiece.CONTROL:  # SentencePiece decodes these to ""
                    self._text_of[i] = p.piece
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"{self.path} defines no BOS/EOS piece; train it with bos_id/eos_id set (the "
                "`train` command here does)."
            )
        # What transformers would call the added/special tokens of this model alone.
        self.special_tokens: dict[str, str] = {
            "bos_token": self.sp.IdToPiece(self.bos_id),
            "eos_token": self.sp.IdToPiece(self.eos_id),
            "unk_token": self.sp.IdToPiece(self.unk_id),
            "pad_token": self.sp.IdToPiece(self.pad_id),
        }
        self.additional_special_tokens: tuple[str, ...] = tuple(
            sorted(self.special_ids, key=self.special_ids.get)
        )
        self.added_tokens: dict[str, hf.AddedToken] = {
            text: hf.AddedToken(text, self._piece_id(text))
            for text in [*self.special_tokens.values(), *self.additional_special_tokens]
        }
        # encode() cuts text at these strings itself: control pieces (how some released models
        # store special tokens) are never matched inside text by SentencePiece.
        self._split: dict[str, hf.AddedToken] = {
            t: hf.AddedToken(t, i) for t, i in self.special_ids.items()
        }
        directory = os.path.dirname(os.path.abspath(self.path))
        if hf_files and os.path.basename(self.path) == SHIPPED_MODEL and hf.has_hf_files(directory):
            try:
                self._apply_hf_files(hf.read_hf_files(directory))
            except hf.TokenizerFilesError as e:
                raise TokenizerError(str(e)) from None
        self._special_re = (
            re.compile("(" + "|".join(map(re.escape, sorted(self._split, key=len)[::-1])) + ")")
            if self._split
            else None
        )
        # Cheap pre-check: text without this prefix holds no special token ("<|" usually).
        self._split_prefix = os.path.commonprefix(list(self._split)) if self._split else ""

    def _piece_id(self, text: str) -> int:
        i = self.sp.PieceToId(text)
        if self.sp.IdToPiece(i) != text:
            raise TokenizerError(
                f"{text!r} is neither a piece of {self.path} nor an added token in its "
                "tokenizer_config.json / added_tokens.json; the tokenizer files do not belong "
                "to this tokenizer.model."
            )
        return i

    def _apply_hf_files(self, files: hf.HFTokenizerFiles) -> None:
        """Added tokens, special tokens, BOS/EOS flags, chat template, generation EOS ids."""
        added = {t.content: t for t in files.added}
        for t in files.added:
            self._text_of[t.id] = t.content
            self.vocab_size = max(self.vocab_size, t.id + 1)

        def token_id(text: str) -> int:
            return added[text].id if text in added else self._piece_id(text)

        self.special_tokens.update(files.special_tokens)
        for key, attr in (
            ("bos_token", "bos_id"),
            ("eos_token", "eos_id"),
            ("unk_token", "unk_id"),
        ):
            if key in files.special_tokens:
                setattr(self, attr, token_id(files.special_tokens[key]))
        self.pad_id = (
            token_id(self.special_tokens["pad_token"])
            if "pad_token" in files.special_tokens
            else self.eos_id
        )
        self.special_tokens["pad_token"] = self.id_to_piece(self.pad_id)
        if files.additional_special_tokens:
            self.additional_special_tokens = files.additional_special_tokens
        # transformers splits text on every added token and every special token.
        for text in [*self.special_tokens.values(), *self.additional_special_tokens]:
            added.setdefault(text, hf.AddedToken(text, token_id(text)))
        self.added_tokens = added
        self._split = dict(added)
        plain = set(self.special_tokens.values())
        self.special_ids.update({t: a.id for t, a in added.items() if t not in plain})
        if files.add_bos_token is not None:
            self.add_bos = files.add_bos_token
        if files.add_eos_token is not None:
            self.add_eos = files.add_eos_token
        self.chat_template = files.chat_template
        self._extra_stop_ids = tuple(i for i in files.generation_eos_ids if i < self.vocab_size)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def encode(
        self, text: str, add_bos: bool | None = None, add_eos: bool | None = None
    ) -> list[int]:
        """Ids of `text`; BOS/EOS per the arguments, else the tokenizer's defaults (BOS yes,
        EOS no, unless its tokenizer_config.json says otherwise)."""
        ids = self._encode(text)
        if self.add_bos if add_bos is None else add_bos:
            ids = [self.bos_id, *ids]
        if self.add_eos if add_eos is None else add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of several texts without BOS/EOS (one C++ call when none holds a special token)."""
        if self._special_re is not None and any(self._may_split(t) for t in texts):
            return [self._encode(t) for t in texts]
        return self.sp.EncodeAsIds(list(texts))

    def _may_split(self, text: str) -> bool:
        return self._split_prefix in text and self._special_re.search(text) is not None

    def _encode(self, text: str) -> list[int]:
        if self._special_re is None or self._split_prefix not in text:
            return self.sp.EncodeAsIds(text)
        parts = self._special_re.split(text)  # odd parts are the special / added tokens
        if len(parts) == 1:
            return self.sp.EncodeAsIds(text)
        for k in range(1, len(parts), 2):  # transformers' AddedToken lstrip / rstrip
            token = self._split[parts[k]]
            if token.lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
            if token.rstrip:
                parts[k + 1] = parts[k + 1].lstrip()
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._split[part].id)
            elif part:
                ids += self.sp.EncodeAsIds(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        drop = {self.bos_id, self.eos_id, self.pad_id}
        ids = [int(i) for i in ids if int(i) not in drop]
        if not any(i in self._text_of for i in ids):
            return self.sp.DecodeIds(ids)
        parts, run = [], []
        for i in ids:
            if i in self._text_of:
                parts += [self.sp.DecodeIds(run), self._text_of[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self.sp.DecodeIds(run)

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        return self._text_of[i] if i >= self.num_pieces else self.sp.IdToPiece(i)

    def special_id(self, token: str) -> int:
        """Id of a special token; a clear error when this model does not define it."""
        try:
            return self.special_ids[token]
        except KeyError:
            raise TokenizerError(
                f"{self.path} has no single-id {token!r}; models trained with `python -m "
                "loopcoder_jax.data.tokenizer train` reserve all of "
                f"{list(SPECIAL_TOKENS)}."
            ) from None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: EOS, `<|im_end|>` / `<|endoftext|>` when defined, and the
        `eos_token_id`s of a generation_config.json beside the model."""
        extra = [
            self.special_ids[t] for t in ("<|im_end|>", "<|endoftext|>") if t in self.special_ids
        ]
        return tuple(dict.fromkeys((self.eos_id, *extra, *self._extra_stop_ids)))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        **extra,
    ) -> str:
        """The prompt text of a chat: the checkpoint's own Jinja template when it has one
        (rendered as transformers does, with `bos_token`/`eos_token`/...), else ChatML.
        `extra` are further template variables (e.g. `tools`)."""
        return render_chat(
            messages,
            self.chat_template,
            add_generation_prompt,
            special_tokens={
                **self.special_tokens,
                "additional_special_tokens": list(self.additional_special_tokens),
            },
            **extra,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True, **extra
    ) -> list[int]:
        """Ids of a chat prompt: `apply_chat_template`, then `encode` with BOS unless the
        template already starts with the BOS text (no doubled BOS)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        return self.encode(text, add_bos=None if not self.starts_with_bos(text) else False)

    def starts_with_bos(self, text: str) -> bool:
        """Whether `text` (a rendered template) already begins with the BOS token's text."""
        bos = self.special_tokens.get("bos_token")
        return bool(bos) and bos in self._split and text.startswith(bos)


def apply_chat_template(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
) -> str:
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then (when
    `add_generation_prompt`) `<|im_start|>assistant\\n` for the model to continue.
    (`Tokenizer.apply_chat_template` uses a checkpoint's own template when it has one.)"""
    try:
        return chatml(messages, add_generation_prompt)
    except ChatTemplateError as e:
        raise ValueError(str(e)) from None


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Loads a SentencePiece model; None = the model shipped in the package (vocab 512).

    A directory is accepted too (a run dir, a converted checkpoint or a Hugging Face checkpoint
    holding `tokenizer.model`, with its tokenizer JSON files when present).
    """
    if path is None:
        return Tokenizer(shipped_model_path())
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SHIPPED_MODEL)
    return Tokenizer(path)


# ---------------------------------------------------------------------------- training
def iter_training_text(paths: Sequence[str], text_field: str = "text") -> Iterator[str]:
    """Texts of plain-text files (one document per file) and JSONL files (`text_field`, or the
    contents of chat `messages`); unparsable JSONL lines are skipped."""
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if not isinstance(record, dict):
                        continue
                    if isinstance(record.get(text_field), str):
                        yield record[text_field]
                    elif isinstance(record.get("messages"), list):
                        for m in record["messages"]:
                            if isinstance(m, dict) and isinstance(m.get("content"), str):
                                yield m["content"]
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def _expand(inputs: Sequence[str]) -> list[str]:
    paths = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(p) for p in matches):
            raise TokenizerError(
                f"Tokenizer training input {pattern!r} matches no file; pass existing .jsonl "
                "or text files (globs allowed)."
            )
        paths.extend(matches)
    return paths


def train_tokenizer(
    inputs: Sequence[str],
    vocab_size: int,
    output_prefix: str,
    *,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 1.0,
    max_sentence_length: int = 1 << 16,
    max_documents: int = 0,
    text_field: str = "text",
    extra_special_tokens: Sequence[str] = (),
    num_threads: int = 1,
) -> str:
    """Trains a SentencePiece model for code; returns the path of `{output_prefix}.model`.

    Code-preserving settings: identity normalisation, no dummy prefix, whitespace and newlines
    kept (runs of spaces can be pieces), digits split, and byte fallback so any UTF-8 text
    round-trips exactly (`<0x..>` pieces take 256 ids: turn it off only for toy vocabularies,
    where characters outside the training text then become `<unk>`). `max_documents` > 0 trains
    on a seeded sample of that many documents (for large corpora).
    `<unk>`=0 `<s>`=1 `</s>`=2 `<pad>`=3, then `SPECIAL_TOKENS` + `extra_special_tokens` as
    single ids. Training is deterministic for a given input and `num_threads=1`. Outputs are
    written under temporary names and renamed.
    """
    paths = _expand(inputs)
    specials = list(SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    reserved = 4 + len(specials) + (256 if byte_fallback else 0)
    if vocab_size <= reserved:
        raise TokenizerError(
            f"--vocab-size {vocab_size} leaves no room for pieces: {reserved} ids are reserved "
            "(4 control + special tokens + 256 byte-fallback pieces); raise it."
        )
    output_prefix = os.fspath(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    def documents() -> Iterator[str]:
        # Whole documents go in as "sentences" (the iterator API, unlike SentencePiece's file
        # input, allows newlines inside), so pieces such as "):\n" or "\n\n" can be learned.
        for text in iter_training_text(paths, text_field):
            for start in range(0, len(text), max_sentence_length):
                chunk = text[start : start + max_sentence_length]
                if chunk.strip():
                    yield chunk

    if next(documents(), None) is None:
        raise TokenizerError(f"No training text found in {paths}.")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=documents(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=max_sentence_length,
            user_defined_symbols=specials,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            num_threads=num_threads,
            input_sentence_size=max_documents,
            shuffle_input_sentence=max_documents > 0,
            seed_sentencepiece_size=1_000_000,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars"
        raise TokenizerError(
            f"SentencePiece training failed: {e}. With byte fallback the vocab must exceed "
            f"256 + {4 + len(specials)} reserved ids + the distinct characters of the input."
        ) from None
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = "".join(f"{sp.IdToPiece(i)}\t{sp.GetScore(i)}\n" for i in range(sp.GetPieceSize()))
    _write_atomic(output_prefix + ".model", proto)
    _write_atomic(output_prefix + ".vocab", vocab.encode("utf-8"))
    return output_prefix + ".model"


def _write_atomic(path: str, data: bytes) -> None:
    staged = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(staged, "wb") as f:
        f.write(data)
    os.replace(staged, path)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m loopcoder_jax.data.tokenizer` command line (options show their defaults)."""
    from loopcoder_jax.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="python -m loopcoder_jax.data.tokenizer",
        description="Train a SentencePiece tokenizer with the special tokens, or show how one "
        "tokenizes a text (docs/data.md).",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="train a SentencePiece model with the special tokens",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    t.add_argument("--input", nargs="+", required=True, help=".jsonl or text files (globs ok)")
    t.add_argument(
        "--vocab-size", type=int, required=True,
        help="pieces in the model (> 256 + 13 + distinct characters with byte fallback)",
    )  # fmt: skip
    t.add_argument("--output", required=True, help="output prefix: writes PREFIX.model/.vocab")
    t.add_argument(
        "--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece algorithm"
    )
    t.add_argument(
        "--no-byte-fallback", action="store_true",
        help="no byte pieces: unknown characters become <unk> (saves 256 ids)",
    )  # fmt: skip
    t.add_argument("--text-field", default="text", help="JSONL key of the document text")
    t.add_argument(
        "--extra-special-tokens", nargs="*", default=[],
        help="more user-defined special tokens, after the built-in ones",
    )  # fmt: skip
    t.add_argument("--num-threads", type=int, default=1, help="trainer threads (1 = deterministic)")
    t.add_argument("--max-documents", type=int, default=0, help="sample this many (0 = all)")
    e = sub.add_parser(
        "encode", help="show how a model tokenizes a text", formatter_class=HelpFormatter
    )
    e.add_argument("--model", default=None, help="tokenizer.model (default: the shipped one)")
    e.add_argument("--text", required=True, help="the text to tokenize")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            path = train_tokenizer(
                args.input,
                args.vocab_size,
                args.output,
                model_type=args.model_type,
                byte_fallback=not args.no_byte_fallback,
                text_field=args.text_field,
                extra_special_tokens=args.extra_special_tokens,
                num_threads=args.num_threads,
                max_documents=args.max_documents,
            )
            tok = load_tokenizer(path)
            print(f"wrote {path}: vocab_size={tok.vocab_size} special_ids={tok.special_ids}")
        else:
            tok = load_tokenizer(args.model)
            ids = tok.encode(args.text)
            print(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}))
    except TokenizerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
