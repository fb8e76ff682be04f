"""Hugging Face (PyTorch safetensors) names <-> the stacked Flax parameter tree.

One table, `_LAYER_ROWS` + `_GLOBAL_ROWS`: each row is (HF name, Flax path, transform).
torch Linear weights are [out, in]; Flax kernels are [in, out] with head axes split out, so
a row's transform says how to go from the HF tensor to the Flax leaf; `_inverse` undoes it.
Per-layer tensors are stacked on the leading `layers` axis. Works on numpy arrays (bf16 via
ml_dtypes), so no torch is needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from loopcoder_jax.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint does not match what the config expects; the message names the tensor."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """HF tensor -> Flax leaf: optional transpose, then a reshape to `flax_shape(cfg)`."""

    transpose: bool
    flax_shape: callable  # cfg -> per-layer Flax shape
    hf_shape: callable  # cfg -> HF shape


def _t(flax_shape, hf_shape, transpose=True):
    return Transform(transpose, flax_shape, hf_shape)


def _nh(c):
    return c.num_attention_heads * c.head_dim


def _kh(c):
    return c.num_key_value_heads * c.head_dim


# (HF name with {i} for the layer, Flax path under params["layers"], transform)
_LAYER_ROWS = (
    (
        "model.layers.{i}.self_attn.q_proj.weight",
        ("self_attn", "q_proj", "kernel"),
        _t(
            lambda c: (c.hidden_size, c.num_attention_heads, c.head_dim),
            lambda c: (_nh(c), c.hidden_size),
        ),
    ),
    (
        "model.layers.{i}.self_attn.k_proj.weight",
        ("self_attn", "k_proj", "kernel"),
        _t(
            lambda c: (c.hidden_size, c.num_key_value_heads, c.head_dim),
            lambda c: (_kh(c), c.hidden_size),
        ),
    ),
    (
        "model.layers.{i}.self_attn.v_proj.weight",
        ("self_attn", "v_proj", "kernel"),
        _t(
            lambda c: (c.hidden_size, c.num_key_value_heads, c.head_dim),
            lambda c: (_kh(c), c.hidden_size),
        ),
    ),
    (
        "model.layers.{i}.self_attn.o_proj.weight",
        ("self_attn", "o_proj", "kernel"),
        _t(
            lambda c: (c.num_attention_heads, c.head_dim, c.hidden_size),
            lambda c: (c.hidden_size, _nh(c)),
        ),
    ),
    (
        "model.layers.{i}.mlp.gate_proj.weight",
        ("mlp", "gate_proj", "kernel"),
        _t(lambda c: (c.hidden_size, c.intermediate_size), lambda c: (c.intermediate_size, c.hidden_size)),
    ),
    (
        "model.layers.{i}.mlp.up_proj.weight",
        ("mlp", "up_proj", "kernel"),
        _t(lambda c: (c.hidden_size, c.intermediate_size), lambda c: (c.intermediate_size, c.hidden_size)),
    ),
    (
        "model.layers.{i}.mlp.down_proj.weight",
        ("mlp", "down_proj", "kernel"),
        _t(lambda c: (c.intermediate_size, c.hidden_size), lambda c: (c.hidden_size, c.intermediate_size)),
    ),
    (
        "model.layers.{i}.input_layernorm.weight",
        ("input_layernorm", "scale"),
        _t(lambda c: (c.hidden_size,), lambda c: (c.hidden_size,), transpose=False),
    ),
    (
        "model.layers.{i}.post_attention_layernorm.weight",
        ("post_attention_layernorm", "scale"),
        _t(lambda c: (c.hidden_size,), lambda c: (c.hidden_size,), transpose=False),
    ),
)

# Gate rows exist only for loop_num >= 2 (the dense checkpoints have no gate tensors).
_GATE_ROWS = (
    (
        "model.gate_projections.{i}.weight",
        ("self_attn", "loop_gate", "kernel"),
        _t(
            lambda c: (c.num_attention_heads, c.head_dim),
            lambda c: (c.num_attention_heads, c.head_dim),
            transpose=False,
        ),
    ),
    (
        "model.gate_projections.{i}.bias",
        ("self_attn", "loop_gate", "bias"),
        _t(lambda c: (c.num_attention_heads,), lambda c: (c.num_attention_heads,), transpose=False),
    ),
)

_GLOBAL_ROWS = (
    (
        "model.embed_tokens.weight",
        ("embed_tokens", "embedding"),
        _t(lambda c: (c.vocab_size, c.hidden_size), lambda c: (c.vocab_size, c.hidden_size), False),
    ),
    (
        "model.norm.weight",
        ("norm", "scale"),
        _t(lambda c: (c.hidden_size,), lambda c: (c.hidden_size,), transpose=False),
    ),
)

_LM_HEAD_ROW = (
    "lm_head.weight",
    ("lm_head", "kernel"),
    _t(lambda c: (c.hidden_size, c.vocab_size), lambda c: (c.vocab_size, c.hidden_size)),
)


def layer_rows(cfg: ModelConfig):
    """The per-layer rows that apply to `cfg`."""
    if not cfg.is_released_architecture:
        raise CheckpointError(
            f"gate_type={cfg.gate_type!r}, untied_loops={cfg.untied_loops} is a research "
            "ablation with no Hugging Face checkpoint format; only gate_type='query' with tied "
            "loops converts."
        )
    return _LAYER_ROWS + (_GATE_ROWS if cfg.has_gate else ())


def global_rows(cfg: ModelConfig):
    """The non-layer rows that apply to `cfg`."""
    return _GLOBAL_ROWS + (() if cfg.tie_word_embeddings else (_LM_HEAD_ROW,))


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name `cfg` implies, with its shape."""
    out = {name: tr.hf_shape(cfg) for name, _, tr in global_rows(cfg)}
    for i in range(cfg.num_hidden_layers):
        for name, _, tr in layer_rows(cfg):
            out[name.format(i=i)] = tr.hf_shape(cfg)
    return out


def hf_to_flax_leaf(x: np.ndarray, tr: Transform, cfg: ModelConfig) -> np.ndarray:
    """One HF tensor -> one (per-layer or global) Flax leaf."""
    if tr.transpose:
        x = x.T
    return np.ascontiguousarray(x).reshape(tr.flax_shape(cfg))


def flax_to_hf_leaf(x: np.ndarray, tr: Transform, cfg: ModelConfig) -> np.ndarray:
    """Inverse of `hf_to_flax_leaf`."""
    hf = tr.hf_shape(cfg)
    if tr.transpose:
        return np.ascontiguousarray(x.reshape(hf[::-1]).T)
    return np.ascontiguousarray(x.reshape(hf))


def _set(tree: dict, path: tuple[str, ...], value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def check_names(cfg: ModelConfig, names, shapes: Mapping[str, tuple] | None = None):
    """Raises `CheckpointError` naming missing/unexpected tensors and shape mismatches."""
    expected = expected_hf_shapes(cfg)
    names = set(names)
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    if shapes is not None:
        bad = [
            f"{n}: checkpoint {tuple(shapes[n])} vs config {expected[n]}"
            for n in sorted(names & set(expected))
            if tuple(shapes[n]) != tuple(expected[n])
        ]
        if bad:
            problems.append("shape mismatches " + "; ".join(bad[:8]))
    if problems:
        raise CheckpointError(
            "Checkpoint does not match the config (layers="
            f"{cfg.num_hidden_layers}, loop_num={cfg.loop_num}, tied="
            f"{cfg.tie_word_embeddings}): " + "; ".join(problems) + ". Check that config.json "
            "belongs to these weights (a dense checkpoint has no gate_projections; "
            "loop_num >= 2 needs them)."
        )


def hf_to_params(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], dtype=None) -> dict:
    """HF state dict (name -> numpy array) -> Flax `params` tree with stacked layers.

    Args:
      cfg: the model config the tensors belong to.
      tensors: every official tensor, as numpy arrays ([out, in] Linear layout).
      dtype: optional numpy dtype to cast to (default: keep each tensor's dtype).
    """
    check_names(cfg, tensors.keys(), {k: np.shape(v) for k, v in tensors.items()})
    params: dict = {}

    def cast(x):
        return x if dtype is None else x.astype(dtype)

    for name, path, tr in global_rows(cfg):
        _set(params, path, cast(hf_to_flax_leaf(np.asarray(tensors[name]), tr, cfg)))
    for name, path, tr in layer_rows(cfg):
        stacked = np.stack(
            [
                hf_to_flax_leaf(np.asarray(tensors[name.format(i=i)]), tr, cfg)
                for i in range(cfg.num_hidden_layers)
            ]
        )
        _set(params, ("layers", *path), cast(stacked))
    return params


def params_to_hf(cfg: ModelConfig, params, dtype=None) -> dict[str, np.ndarray]:
    """Flax `params` tree -> HF state dict of numpy arrays (inverse of `hf_to_params`)."""

    def cast(x):
        x = np.asarray(x)
        return x if dtype is None else x.astype(dtype)

    out = {}
    for name, path, tr in global_rows(cfg):
        out[name] = cast(flax_to_hf_leaf(np.asarray(_get(params, path)), tr, cfg))
    for name, path, tr in layer_rows(cfg):
        stacked = np.asarray(_get(params, ("layers", *path)))
        for i in range(cfg.num_hidden_layers):
            out[name.format(i=i)] = cast(flax_to_hf_leaf(stacked[i], tr, cfg))
    return out
