"""The Hugging Face tokenizer files that sit beside a SentencePiece `tokenizer.model`.

A released checkpoint's tokenizer is `tokenizer.model` plus JSON that transformers reads:
`tokenizer_config.json` (`added_tokens_decoder`, `bos/eos/unk/pad_token`, `add_bos_token`,
`add_eos_token`, `chat_template`), `added_tokens.json`, `special_tokens_map.json` (overrides the
special tokens of tokenizer_config.json, as in transformers), `chat_template.jinja` (newer
transformers keep the template there) and `generation_config.json` (its `eos_token_id`s stop
generation). *Added tokens* are whole strings with their own ids, possibly above the
SentencePiece piece count: transformers cuts them out of the text before SentencePiece sees it,
so each is one id, and decodes them back to their text. `read_hf_files` gathers all of it;
`data.tokenizer.Tokenizer` applies it.

`write_hf_files` writes the same layout for a stock transformers class (`LlamaTokenizer`, the
SentencePiece tokenizer, in its `legacy` mode: SentencePiece encodes each piece of text between
added tokens as is), so `AutoTokenizer.from_pretrained(dir)` loads an export without remote code
and gives our ids. Reading never executes anything from the files; the chat template is
rendered in jinja2's sandbox (`data.chat_template`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
# Everything a tokenizer directory may hold (copied together by the converter).
TOKENIZER_FILES = (
    TOKENIZER_MODEL,
    TOKENIZER_CONFIG,
    SPECIAL_TOKENS_MAP,
    ADDED_TOKENS,
    CHAT_TEMPLATE_FILE,
)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
MAX_JSON_BYTES = 64 * 2**20  # a tokenizer JSON file is kilobytes; refuse absurd ones unread


class TokenizerFilesError(ValueError):
    """A tokenizer JSON file is malformed; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A string that is one id wherever it appears in text (transformers' `AddedToken`).

    lstrip / rstrip: whitespace on that side of the token is dropped when encoding.
    """

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


@dataclasses.dataclass(frozen=True)
class HFTokenizerFiles:
    """What the JSON files of a tokenizer directory say (None: the file does not say)."""

    added: tuple[AddedToken, ...] = ()
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)  # bos_token: ...
    additional_special_tokens: tuple[str, ...] = ()
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    chat_template: str | None = None
    generation_eos_ids: tuple[int, ...] = ()


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):  # False for FIFOs, sockets, directories: never opened
        return None
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise TokenizerFilesError(
            f"{path} is larger than {MAX_JSON_BYTES} bytes; not a tokenizer file."
        )
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerFilesError(f"{path} is not valid JSON ({e}); re-download it.") from None
    if not isinstance(out, dict):
        raise TokenizerFilesError(f"{path} must hold a JSON object.")
    return out


def _token_text(value, where: str) -> str | None:
    """A special token as transformers stores it: a string or {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerFilesError(f"{where}: expected a string or {{'content': ...}}, got {value!r}.")


def _token_id(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise TokenizerFilesError(
            f"{where}: token id must be a non-negative integer, got {value!r}."
        )
    return value


def _flag(value, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise TokenizerFilesError(f"{where} must be true or false, got {value!r}.")


def _chat_template(config: dict, where: str) -> str | None:
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerFilesError(f"{where}: chat_template must be a string (or named templates).")


def has_hf_files(directory: str | os.PathLike) -> bool:
    """True when `directory` holds transformers tokenizer JSON beside its tokenizer.model."""
    directory = os.fspath(directory)
    return any(
        os.path.isfile(os.path.join(directory, n))
        for n in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS, CHAT_TEMPLATE_FILE)
    )


def read_hf_files(directory: str | os.PathLike) -> HFTokenizerFiles:
    """Reads the tokenizer JSON files of `directory` the way transformers combines them."""
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, TOKENIZER_CONFIG)
    config = _read_json(cfg_path) or {}
    added: dict[str, AddedToken] = {}

    def add(token: AddedToken, where: str):
        old = added.get(token.content)
        if old is not None and old.id != token.id:
            raise TokenizerFilesError(
                f"{where}: {token.content!r} has id {token.id} but also {old.id}; fix the file."
            )
        added[token.content] = token

    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise TokenizerFilesError(f"{cfg_path}: added_tokens_decoder must be an object.")
    for key, entry in decoder.items():
        where = f"{cfg_path}: added_tokens_decoder[{key!r}]"
        try:
            i = int(key)
        except ValueError:
            raise TokenizerFilesError(f"{where}: the key must be a token id.") from None
        content = _token_text(entry, where)
        if not content:
            raise TokenizerFilesError(f"{where}: needs a non-empty 'content'.")
        flags = entry if isinstance(entry, Mapping) else {}
        add(
            AddedToken(
                content,
                _token_id(i, where),
                special=bool(flags.get("special", True)),
                lstrip=bool(flags.get("lstrip", False)),
                rstrip=bool(flags.get("rstrip", False)),
            ),
            where,
        )
    legacy_path = os.path.join(directory, ADDED_TOKENS)
    for content, i in (_read_json(legacy_path) or {}).items():
        where = f"{legacy_path}: {content!r}"
        if content not in added:
            add(AddedToken(content, _token_id(i, where), special=False), where)

    specials: dict[str, str] = {}
    extra = config.get("additional_special_tokens") or []
    for key in _SPECIAL_KEYS:
        text = _token_text(config.get(key), f"{cfg_path}: {key}")
        if text is not None:
            specials[key] = text
    map_path = os.path.join(directory, SPECIAL_TOKENS_MAP)
    smap = _read_json(map_path) or {}
    for key in _SPECIAL_KEYS:  # special_tokens_map.json wins, as in transformers
        text = _token_text(smap.get(key), f"{map_path}: {key}")
        if text is not None:
            specials[key] = text
    extra = smap.get("additional_special_tokens", extra)
    if not isinstance(extra, list):
        raise TokenizerFilesError(f"{map_path}: additional_special_tokens must be a list.")
    additional = tuple(_token_text(t, f"{map_path}: additional_special_tokens") for t in extra)

    template = _chat_template(config, cfg_path)
    jinja_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja_path):  # transformers prefers the separate file
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()

    gen_path = os.path.join(directory, GENERATION_CONFIG)
    eos = (_read_json(gen_path) or {}).get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return HFTokenizerFiles(
        added=tuple(sorted(added.values(), key=lambda t: t.id)),
        special_tokens=specials,
        additional_special_tokens=tuple(t for t in additional if t),
        add_bos_token=_flag(config.get("add_bos_token"), f"{cfg_path}: add_bos_token"),
        add_eos_token=_flag(config.get("add_eos_token"), f"{cfg_path}: add_eos_token"),
        chat_template=template,
        generation_eos_ids=tuple(_token_id(e, f"{gen_path}: eos_token_id") for e in eos),
    )


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def tokenizer_config(tok, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json for `tok` (a `data.tokenizer.Tokenizer`) as a stock
    `LlamaTokenizer`: every added/special token with its id, the special tokens, BOS/EOS
    flags, and the chat template (the tokenizer's own, else ChatML)."""
    from loopcoder_jax.data.chat_template import CHATML_JINJA

    decoder = {
        str(t.id): {
            "content": t.content,
            "special": t.special,
            "lstrip": t.lstrip,
            "rstrip": t.rstrip,
            "normalized": False,
            "single_word": False,
        }
        for t in sorted(tok.added_tokens.values(), key=lambda t: t.id)
    }
    out = {
        "tokenizer_class": "LlamaTokenizer",
        # legacy: SentencePiece encodes each span between added tokens as it is (our encode);
        # add_prefix_space follows the model's own dummy-prefix setting.
        "legacy": True,
        "add_prefix_space": tok.add_dummy_prefix,
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(tok.additional_special_tokens),
        "chat_template": tok.chat_template or CHATML_JINJA,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "sp_model_kwargs": {},
        **tok.special_tokens,
    }
    if model_max_length is not None:
        out["model_max_length"] = int(model_max_length)
    return out


def write_hf_files(directory: str | os.PathLike, tok, model_max_length: int | None = None):
    """Writes tokenizer.model, tokenizer_config.json and special_tokens_map.json for `tok`
    into `directory` (mode 0644); returns the file names."""
    import shutil

    directory = os.fspath(directory)
    model = os.path.join(directory, TOKENIZER_MODEL)
    if os.path.abspath(tok.path) != os.path.abspath(model):
        shutil.copyfile(tok.path, model)
    write_json(os.path.join(directory, TOKENIZER_CONFIG), tokenizer_config(tok, model_max_length))
    smap = {**tok.special_tokens, "additional_special_tokens": list(tok.additional_special_tokens)}
    write_json(os.path.join(directory, SPECIAL_TOKENS_MAP), smap)
    names = [TOKENIZER_MODEL, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]
    for name in names:
        os.chmod(os.path.join(directory, name), 0o644)
    return names
