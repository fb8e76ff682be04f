"""Configuration: the HF-shaped `ModelConfig`, the non-checkpoint `RuntimeConfig`, presets, YAML.

`ModelConfig` holds exactly what changes the meaning of a checkpoint and uses the Hugging Face
`config.json` key names of `IQuestLoopCoderForCausalLM` (DESIGN.md §1), so `from_hf` / `to_hf`
are a rename-free round trip. Everything that only changes *how* the model runs (dtypes,
attention kernel, rematerialisation, scan vs unrolled layers) lives in `RuntimeConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


# HF config.json keys that carry no meaning for this implementation (bookkeeping written by
# transformers, or features fixed to one value we check below). They are accepted and dropped.
_IGNORED_HF_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "model_type",
        "transformers_version",
        "use_cache",
        "attention_dropout",
        "pretraining_tp",
        "_name_or_path",
        "dtype",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "is_decoder",
        "torchscript",
        "_attn_implementation_autoset",
        "mlp_bias",
        "attention_bias",
        "rope_scaling",
    }
)


GATE_TYPES = frozenset({"query", "fixed", "hidden"})
_ABLATION_DEFAULTS = {"gate_type": "query", "untied_loops": False}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LoopCoder architecture, in Hugging Face `config.json` vocabulary.

    `loop_num` is the number of times the ONE shared layer stack is applied (2 in the released
    models); `loop_num=1` is exactly the dense IQuest-Coder (Llama) model. In loops >= 1 each
    layer mixes global attention over the loop-0 K/V with local attention over a window of
    `loop_window_size` keys (key j visible to query i iff i - W < j <= i) through a per-head
    sigmoid gate.

    `num_key_value_heads`: 1 means MQA, `num_attention_heads` means MHA, anything between is GQA
    (must divide `num_attention_heads`).
    """

    vocab_size: int = 76800
    hidden_size: int = 5120
    intermediate_size: int = 27648
    num_hidden_layers: int = 80  # layers in the ONE shared stack
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    loop_num: int = 2  # times the stack is applied; 1 == dense Llama
    loop_window_size: int = 64  # W of the local branch in loops >= 1
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (2, 75864, 75869)
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # ---- research ablations (not in the released config.json; no HF export for non-defaults)
    gate_type: str = "query"  # "query" (released), "fixed" (g = 0.5), "hidden" (from layer input)
    untied_loops: bool = False  # True: a separate weight stack per loop (isolates weight sharing)

    def __post_init__(self):
        if self.eos_token_id is None:  # config.json `"eos_token_id": null`: no stop id
            object.__setattr__(self, "eos_token_id", ())
        elif isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif not isinstance(self.eos_token_id, tuple):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_key_value_heads={self.num_key_value_heads}; GQA needs every kv head "
                "to serve the same number of query heads."
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE.")
        if not isinstance(self.loop_num, int) or self.loop_num < 1:
            raise ConfigError(
                f"model.loop_num must be an integer >= 1 (1 = dense model), got {self.loop_num!r}."
            )
        if not isinstance(self.loop_window_size, int) or self.loop_window_size < 1:
            raise ConfigError(
                f"model.loop_window_size must be an integer >= 1, got {self.loop_window_size!r}."
            )
        if self.hidden_act != "silu":
            raise ConfigError(
                f"model.hidden_act={self.hidden_act!r} is not supported; LoopCoder uses 'silu'."
            )
        if self.gate_type not in GATE_TYPES:
            raise ConfigError(
                f"model.gate_type={self.gate_type!r}; choose one of {sorted(GATE_TYPES)}."
            )
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("model.rope_theta and model.rms_norm_eps must be positive.")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_query_groups(self) -> int:
        """Query heads served by each kv head (G = N / K)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def has_gate(self) -> bool:
        """Gate parameters exist only when some loop mixes global and local attention."""
        return self.loop_num >= 2 and self.gate_type != "fixed"

    @property
    def is_released_architecture(self) -> bool:
        """True unless an ablation option makes the model inexpressible as a HF checkpoint."""
        return self.gate_type == "query" and not self.untied_loops

    def num_params(self) -> int:
        """Number of parameters (shared stack counted once)."""
        d, f, n, k, h = (
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )
        per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f + 2 * d
        if self.has_gate:
            per_layer += (n * h if self.gate_type == "query" else d * n) + n
        stacks = self.loop_num if self.untied_loops else 1
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return stacks * self.num_hidden_layers * per_layer + embed + d

    # ------------------------------------------------------------------ HF round trip
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], strict: bool = True):
        """Builds a config from a HF `config.json` (a path, a directory holding one, or a dict).

        Unknown keys raise `ConfigError` when `strict` (a typo such as `loop_nums` must not be
        silently ignored); transformers' bookkeeping keys are accepted and dropped.
        """
        if isinstance(path_or_dict, Mapping):
            raw = dict(path_or_dict)
            source = "the given dict"
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path) as f:
                    raw = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"No config.json at {path}.") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            source = path
        fields = {f.name for f in dataclasses.fields(cls)}
        if raw.get("rope_scaling") not in (None, {}):
            raise ConfigError(
                f"rope_scaling={raw['rope_scaling']!r} in {source} is not supported (the "
                "released LoopCoder models use plain RoPE); remove it or set it to null."
            )
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ConfigError(f"{flag}=true in {source} is not supported: LoopCoder has none.")
        unknown = sorted(k for k in raw if k not in fields and k not in _IGNORED_HF_KEYS)
        if unknown and strict:
            raise ConfigError(
                f"Unknown config keys {unknown} in {source}. Fix the spelling, or pass "
                "strict=False to ignore them."
            )
        kwargs = {k: v for k, v in raw.items() if k in fields}
        if "head_dim" not in kwargs and "hidden_size" in kwargs and "num_attention_heads" in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        # Missing means none (DESIGN.md §7: then the tokenizer's end ids), never the 40B's ids.
        kwargs.setdefault("eos_token_id", ())
        if raw.get("model_type") == "llama" or "loop_num" not in raw:
            kwargs.setdefault("loop_num", 1)  # a dense Llama-style checkpoint
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (loop or dense architecture name chosen by `loop_num`)."""
        out = dataclasses.asdict(self)
        out["eos_token_id"] = list(self.eos_token_id)
        for ablation in ("gate_type", "untied_loops"):  # keep released configs HF-clean
            if out[ablation] == _ABLATION_DEFAULTS[ablation]:
                del out[ablation]
        if self.loop_num == 1:
            out["architectures"] = ["LlamaForCausalLM"]
            out["model_type"] = "llama"
        else:
            out["architectures"] = ["IQuestLoopCoderForCausalLM"]
            out["model_type"] = "iquestloopcoder"
        out["attention_bias"] = False
        out["mlp_bias"] = False
        out["rope_scaling"] = None
        out["use_cache"] = True
        return out

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


class AttnImpl(enum.Enum):
    """Attention kernel. XLA is the blockwise reference path that runs everywhere."""

    XLA = "xla"
    SPLASH = "splash"  # Pallas TPU splash attention (see kernels/)
    AUTO = "auto"  # splash when the mesh's devices are TPUs, else XLA (kernels.resolve_impl)


class Remat(enum.Enum):
    """What each scanned layer saves for the backward pass (a `jax.checkpoint` policy)."""

    NONE = "none"  # save everything: fastest, most memory
    FULL = "full"  # save only the layer inputs; recompute the whole layer
    DOTS = "dots"  # save matmul outputs without batch dims; recompute elementwise ops
    # Named policies (MaxText-style): save only the tagged activations of each layer and
    # recompute the rest (tags in model/layers.py: REMAT_QKV, REMAT_OUT, REMAT_MLP_IN).
    SAVE_QKV = "save_qkv"  # the q/k/v projection outputs
    SAVE_QKV_OUT = "save_qkv_out"  # + the attention output projection
    SAVE_QKV_OUT_MLP_IN = "save_qkv_out_mlp_in"  # + the MLP input (post-attention norm)
    # As save_qkv_out, but the saved activations live in host memory between the forward
    # and the backward pass (TPU; a runtime without a pinned_host memory space refuses it).
    OFFLOAD_QKV_OUT = "offload_qkv_out"


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the model runs; none of this changes what a checkpoint means.

    dtype: compute dtype of activations and matmuls ("float32", "bfloat16"). Norms, softmax
      and the gate are computed in float32 regardless.
    param_dtype: dtype parameters are created in by `init`.
    attn_impl: attention kernel (`AttnImpl`); AUTO = splash on TPU, XLA elsewhere.
    remat: rematerialisation policy of the scanned layer (`Remat`).
    scan_layers: iterate the stacked layer params with `lax.scan` (compile time independent of
      depth). False unrolls a Python loop over layers: for debugging and FLOP counting.
    bptt_grad_scale: scales the gradient that flows from loop k+1 back into loop k (through the
      hidden state and the shared loop-0 K/V); identity in the forward pass. 1.0 = plain BPTT,
      0.0 = truncated BPTT.
    decode_block: keys per block when a decode step attends to the loop-0 cache; blocks past
      the longest row are skipped, so a step costs O(current length), not O(cache length)
      (`kernels.prefix_attention`). 0 = auto: 64 on CPU, 512 on TPU/GPU. A cache length that
      is not a multiple of the block is read in one block (the `Engine` rounds its caches up).
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    attn_impl: AttnImpl = AttnImpl.AUTO  # splash on TPU meshes, XLA elsewhere
    remat: Remat = Remat.NONE
    scan_layers: bool = True
    bptt_grad_scale: float = 1.0
    decode_block: int = 0

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16", "float16"):
                raise ConfigError(
                    f"runtime.{name}={value!r}; use 'float32', 'bfloat16' or 'float16'."
                )
        for name, enum_cls in (("attn_impl", AttnImpl), ("remat", Remat)):
            value = getattr(self, name)
            if not isinstance(value, enum_cls):
                try:
                    object.__setattr__(self, name, enum_cls(value))
                except ValueError:
                    choices = [m.value for m in enum_cls]
                    raise ConfigError(
                        f"runtime.{name}={value!r}; choose one of {choices}."
                    ) from None
        if not 0.0 <= float(self.bptt_grad_scale) <= 1.0:
            raise ConfigError(f"runtime.bptt_grad_scale={self.bptt_grad_scale} must lie in [0, 1].")
        if not isinstance(self.decode_block, int) or self.decode_block < 0:
            raise ConfigError(
                f"runtime.decode_block={self.decode_block!r} must be a non-negative integer "
                "(keys per block of decode attention; 0 = auto)."
            )

    def replace(self, **changes) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- presets
# The official family shares width and heads; the dense models are loop_num=1 Llama stacks.
_OFFICIAL = dict(
    vocab_size=76800,
    hidden_size=5120,
    intermediate_size=27648,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    loop_window_size=64,
    tie_word_embeddings=False,
)

PRESETS: dict[str, ModelConfig] = {
    "loop40b": ModelConfig(**_OFFICIAL, num_hidden_layers=80, loop_num=2),
    "dense40b": ModelConfig(**_OFFICIAL, num_hidden_layers=80, loop_num=1),
    "dense14b": ModelConfig(**_OFFICIAL, num_hidden_layers=28, loop_num=1),
    "dense7b": ModelConfig(**_OFFICIAL, num_hidden_layers=14, loop_num=1),
    # CPU-sized models for tests, demos and the embedded training default.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        loop_num=2,
        loop_window_size=16,
        eos_token_id=(2,),
        torch_dtype="float32",
    ),
    "tiny-dense": ModelConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        loop_num=1,
        loop_window_size=16,
        eos_token_id=(2,),
        torch_dtype="float32",
    ),
}


def preset(name: str) -> ModelConfig:
    """A named `ModelConfig` preset (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.") from None


# ---------------------------------------------------------------------------- YAML + overrides
def _coerce(value: str, like: Any) -> Any:
    """Parses a command-line override string to the type of the field it replaces."""
    parsed = yaml.safe_load(value)
    if isinstance(like, enum.Enum):
        return type(like)(parsed)
    if isinstance(like, bool):
        if not isinstance(parsed, bool):
            raise ConfigError(f"expected true/false, got {value!r}")
        return parsed
    if isinstance(like, int) and not isinstance(like, bool):
        if isinstance(parsed, float) and parsed.is_integer():
            return int(parsed)
        if not isinstance(parsed, int):
            raise ConfigError(f"expected an integer, got {value!r}")
        return parsed
    if isinstance(like, float):
        return float(parsed)
    if isinstance(like, tuple):
        return tuple(parsed) if isinstance(parsed, list) else (parsed,)
    return parsed


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """ " (did you mean 'train.lr'?)" for the closest of `choices`, or "" when none is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def build_dataclass(cls, section: Mapping[str, Any] | None, where: str):
    """Instantiates dataclass `cls` from a mapping, rejecting unknown keys by name."""
    section = dict(section or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        hint = did_you_mean(unknown[0], names, f"{where}.")
        raise ConfigError(
            f"Unknown keys {unknown} in section '{where}'{hint}; valid: {sorted(names)}."
        )
    for k, v in section.items():
        if isinstance(v, list):
            section[k] = tuple(v)
    return cls(**section)


def apply_overrides(obj, overrides: Mapping[str, str], where: str):
    """`dataclasses.replace` with values parsed to each field's type (`--set a.b=1`)."""
    changes = {}
    names = {f.name for f in dataclasses.fields(obj)}
    for key, raw in overrides.items():
        if key not in names:
            hint = did_you_mean(key, names, f"{where}.")
            raise ConfigError(f"Unknown key '{where}.{key}'{hint}; valid: {sorted(names)}.")
        try:
            changes[key] = _coerce(raw, getattr(obj, key))
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"Bad value for '{where}.{key}': {e}") from None
    return dataclasses.replace(obj, **changes)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML preset into a dict of sections; `model:` may name a `preset:` to start from."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"Config file {os.fspath(path)} does not exist.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{os.fspath(path)} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{os.fspath(path)} must hold a mapping of sections.")
    return raw


def model_config_from_section(section: Mapping[str, Any] | None) -> ModelConfig:
    """`model:` section -> ModelConfig; `preset: name` starts from a preset, keys override it."""
    section = dict(section or {})
    base = section.pop("preset", None)
    if base is not None:
        start = dataclasses.asdict(preset(base))
        start.update(section)
        section = start
    if "eos_token_id" in section and isinstance(section["eos_token_id"], list):
        section["eos_token_id"] = tuple(section["eos_token_id"])
    return build_dataclass(ModelConfig, section, "model")


# ---------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training-data pipeline (YAML section `data:`); see docs/data.md.

    Sequence length and batch size are not here: they come from the train config and are
    arguments of `data.pipeline.make_train_iterator`.

    sources: JSONL files (`.jsonl`, one JSON object per line) and ArrayRecord files
      (`.array_record`, one JSON object per record), as paths or globs. Empty = the small code
      corpus shipped in the package (`loopcoder_jax/assets/corpus.jsonl`).
    record_format: "auto" (a record with `messages_field` is a chat conversation, otherwise
      text), "text" or "chat". Chat records train only on assistant tokens (SFT).
    text_field / messages_field: JSON keys of the document text / the chat message list
      (`[{"role": ..., "content": ...}, ...]`).
    tokenizer: path of a SentencePiece `tokenizer.model`; None = the model shipped in the package.
    add_bos / add_eos: wrap each text document in `<s>` ... `</s>`.
    shuffle: shuffle records (per epoch, deterministic given the seed).
    seed: data seed; None = the seed passed to `make_train_iterator` (the train seed).
    num_epochs: passes over the data; None = repeat forever.
    split_long: "always" fills every row completely and splits a document across rows where it
      does not fit (no padding; pretraining); "long_only" starts a document that fits in one row
      on a fresh row instead (some padding; keeps SFT conversations whole).
    fim_rate: fraction of text documents rewritten as file-level fill-in-the-middle
      (`<|fim_prefix|>pre<|fim_suffix|>suf<|fim_middle|>mid<|im_end|>`, DESIGN.md §4).
    worker_count: grain worker processes for reading + tokenizing (0 = in the main process,
      the right choice on small hosts; malformed-record counters then live in this process).
    read_threads: threads reading + tokenizing ahead of the consumer (in each process).
    startup_check_records: records read from the start of each source file before training to
      catch a wrong path, field name or format at once instead of mid-run.
    eval_sources: held-out evaluation files (same formats as `sources`), never trained on.
    eval_fraction: instead of eval_sources, hold out this fraction of the training records
      (chosen by a fixed hash of the record index: the same records for every seed and process
      count) and evaluate on them; they are removed from the training stream. 0 = none.
    """

    sources: tuple[str, ...] = ()
    record_format: str = "auto"
    text_field: str = "text"
    messages_field: str = "messages"
    tokenizer: str | None = None
    add_bos: bool = True
    add_eos: bool = True
    shuffle: bool = True
    seed: int | None = None
    num_epochs: int | None = None
    split_long: str = "always"
    fim_rate: float = 0.0
    worker_count: int = 0
    read_threads: int = 2
    startup_check_records: int = 1000
    eval_sources: tuple[str, ...] = ()
    eval_fraction: float = 0.0

    def __post_init__(self):
        for name in ("sources", "eval_sources"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise ConfigError(
                f"data.eval_fraction={self.eval_fraction} must lie in [0, 1) (e.g. 0.05 holds out "
                "5% of the training records for evaluation)."
            )
        if self.eval_fraction and self.eval_sources:
            raise ConfigError(
                "Both data.eval_sources and data.eval_fraction are set; evaluate on files "
                "(eval_sources) or on held-out training records (eval_fraction), not both."
            )
        if self.record_format not in ("auto", "text", "chat"):
            raise ConfigError(
                f"data.record_format={self.record_format!r}; choose 'auto', 'text' or 'chat'."
            )
        if self.split_long not in ("always", "long_only"):
            raise ConfigError(
                f"data.split_long={self.split_long!r}; choose 'always' or 'long_only'."
            )
        if not 0.0 <= float(self.fim_rate) <= 1.0:
            raise ConfigError(f"data.fim_rate={self.fim_rate} must lie in [0, 1].")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"data.num_epochs={self.num_epochs}; use an integer >= 1 or null.")
        if self.worker_count < 0 or self.startup_check_records < 0:
            raise ConfigError("data.worker_count and data.startup_check_records must be >= 0.")
        if self.read_threads < 1:
            raise ConfigError(f"data.read_threads={self.read_threads} must be >= 1.")

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- mesh + training
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape (YAML section `mesh:`).

    Each value is the number of devices along that mesh axis; exactly one axis may be -1,
    meaning "all remaining devices". data: pure data parallelism (params replicated);
    fsdp: data parallelism with params and optimizer state sharded; tensor: Megatron-style
    tensor parallelism (heads, MLP, vocab); sequence: context parallelism over positions.
    `rules` names the logical->mesh rules table in `sharding.RULES`.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    rules: str = "fsdp_tp"

    def __post_init__(self):
        sizes = {a: getattr(self, a) for a in ("data", "fsdp", "tensor", "sequence")}
        for axis, n in sizes.items():
            if not isinstance(n, int) or isinstance(n, bool) or (n < 1 and n != -1):
                raise ConfigError(f"mesh.{axis}={n!r} must be a positive integer or -1 (fill).")
        if sum(n == -1 for n in sizes.values()) > 1:
            raise ConfigError(f"At most one mesh axis may be -1 (fill); got {sizes}.")

    @property
    def axis_sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in ("data", "fsdp", "tensor", "sequence")}


_SCHEDULES = ("cosine", "linear", "constant")
_NAN_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run-loop settings (YAML section `train:`).

    batch_size is GLOBAL (all processes, all accumulation micro-steps) in sequences of
    seq_len tokens. lr follows `schedule` ("cosine" | "linear" | "constant") after
    `warmup_steps` of linear warmup from 0, decaying to `lr * min_lr_ratio` at `steps`.
    weight_decay is AdamW's decoupled decay, applied to matmul kernels and the gate kernel,
    never to norm scales or the gate bias, and to the embedding only if `decay_embeddings`.
    clip_grad_norm <= 0 disables clipping. z_loss adds z_loss * logsumexp^2 per token.
    loss_chunk: positions per chunk of the chunked cross-entropy (bounds the f32 logits
    buffer to [B, loss_chunk, V]). nan_policy: "stop" raises on a non-finite loss (naming the
    step and the last good checkpoint); "skip" leaves the state unchanged for that step.
    checkpoint_every: save every N steps (and at the end); keep_checkpoints: keep the last K.
    integrity_every: compare the replicas of every replicated parameter and optimizer leaf
    (silent-data-corruption check, `integrity.py`) every N steps and before every save;
    0 = off; -1 (default) = before every save on a multi-device mesh, off on one device.
    data_shards: slices the global batch is read in (one grain iterator each); 0 = one per
    process. Fixing it makes the data stream independent of the number of processes.
    eval_every: evaluate the held-out loss every N steps and at the last step, when there is
    eval data (data.eval_sources / data.eval_fraction); 0 = only at the last step.
    eval_batches: batches per evaluation, each batch_size / grad_accum rows (one micro-batch):
    the first ones of the eval set, the same at every evaluation.
    """

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    clip_grad_norm: float = 1.0
    z_loss: float = 0.0
    loss_chunk: int = 512
    seed: int = 0
    run_dir: str = "runs/tiny"
    init_from: str | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    log_every: int = 10
    nan_policy: str = "stop"
    data_shards: int = 0
    integrity_every: int = -1
    eval_every: int = 100
    eval_batches: int = 8

    def __post_init__(self):
        if self.data_shards < 0:
            raise ConfigError(f"train.data_shards must be >= 0, got {self.data_shards}.")
        if self.eval_every < 0 or self.eval_batches < 1:
            raise ConfigError(
                f"train.eval_every={self.eval_every} must be >= 0 (0 = only at the end) and "
                f"train.eval_batches={self.eval_batches} >= 1."
            )
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "loss_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}.")
        for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.schedule not in _SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r}; choose one of {_SCHEDULES}.")
        if self.nan_policy not in _NAN_POLICIES:
            raise ConfigError(
                f"train.nan_policy={self.nan_policy!r}; choose one of {_NAN_POLICIES}."
            )
        # `.inf` / `.nan` parse as YAML floats and would poison the first update.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"train.{f.name} must be a finite number, got {value}.")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}.")
        if self.integrity_every < -1:
            raise ConfigError(
                f"train.integrity_every must be -1 (auto), 0 (off) or N >= 1, got "
                f"{self.integrity_every}."
            )
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum={self.grad_accum}; each accumulation step needs an equal "
                "micro-batch."
            )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs: YAML sections model/runtime/mesh/train/data."""

    model: ModelConfig
    runtime: RuntimeConfig = RuntimeConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()

    SECTIONS = ("model", "runtime", "mesh", "train", "data")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], overrides: Mapping[str, str] | None = None):
        """Sections dict -> config; `overrides` maps "section.key" to a string value."""
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(cls.SECTIONS))
        if unknown:
            hint = did_you_mean(unknown[0], cls.SECTIONS)
            raise ConfigError(f"Unknown sections {unknown}{hint}; valid: {list(cls.SECTIONS)}.")
        per_section: dict[str, dict[str, str]] = {s: {} for s in cls.SECTIONS}
        for key, value in (overrides or {}).items():
            section, _, name = key.partition(".")
            if not name:
                raise ConfigError(
                    f"Override {key!r} must look like 'section.key=value' with section in "
                    f"{list(cls.SECTIONS)}."
                )
            if section not in per_section:
                raise ConfigError(
                    f"Unknown section '{section}' in override '{key}': the section is wrong"
                    f"{did_you_mean(section, cls.SECTIONS)}; sections: {list(cls.SECTIONS)}."
                )
            per_section[section][name] = value
        model_section = dict(raw.get("model") or {"preset": "tiny"})
        parts = {
            "model": model_config_from_section(model_section),
            "runtime": build_dataclass(RuntimeConfig, raw.get("runtime"), "runtime"),
            "mesh": build_dataclass(MeshConfig, raw.get("mesh"), "mesh"),
            "train": build_dataclass(TrainConfig, raw.get("train"), "train"),
            "data": build_dataclass(DataConfig, raw.get("data"), "data"),
        }
        for section, values in per_section.items():
            if values:
                parts[section] = apply_overrides(parts[section], values, section)
        return cls(**parts)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, overrides: Mapping[str, str] | None = None):
        """Loads `configs/<x>.yaml` (None = all defaults: the tiny embedded run)."""
        return cls.from_dict(load_yaml(path) if path else {}, overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready resolved config (enums as values, model in HF keys)."""

        def plain(obj):
            out = {}
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                out[f.name] = (
                    v.value
                    if isinstance(v, enum.Enum)
                    else (list(v) if isinstance(v, tuple) else v)
                )
            return out

        return {
            "model": plain(self.model),
            "runtime": plain(self.runtime),
            "mesh": plain(self.mesh),
            "train": plain(self.train),
            "data": plain(self.data),
        }

    def replace(self, **changes) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)
