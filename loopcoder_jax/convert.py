"""Hugging Face (PyTorch safetensors) checkpoints <-> the stacked Flax parameter tree.

One table, `_LAYER_ROWS` + `_GATE_ROWS` + `_GLOBAL_ROWS` + `_LM_HEAD_ROW`: each row is (HF name,
Flax path, transform). torch Linear weights are [out, in]; Flax kernels are [in, out] with head
axes split out, so a row's transform says how to go from the HF tensor to the Flax leaf;
`flax_to_hf_leaf` undoes it. Per-layer tensors are stacked on the leading `layers` axis.
Everything works on numpy arrays (bf16 via ml_dtypes): torch is never imported, pickle never
loaded.

Public API (user guide: docs/conversion.md):
  load_hf_checkpoint / save_hf_checkpoint      HF dir <-> (ModelConfig, params) in memory
  hf_to_orbax / orbax_to_hf                    streaming file conversion (the CLI commands)
  fold_dense_to_loop / fold_checkpoint         dense -> loop initialisation (`FOLD_STRATEGIES`)
  hf_to_params / params_to_hf                  the name table applied to in-memory dicts
  main                                         `python -m loopcoder_jax.convert` / loopcoder-convert
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import tqdm

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import checkpoint_stream, hf_export, storage
from loopcoder_jax import safetensors_io as sio
from loopcoder_jax.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


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
        _t(
            lambda c: (c.hidden_size, c.intermediate_size),
            lambda c: (c.intermediate_size, c.hidden_size),
        ),
    ),
    (
        "model.layers.{i}.mlp.up_proj.weight",
        ("mlp", "up_proj", "kernel"),
        _t(
            lambda c: (c.hidden_size, c.intermediate_size),
            lambda c: (c.intermediate_size, c.hidden_size),
        ),
    ),
    (
        "model.layers.{i}.mlp.down_proj.weight",
        ("mlp", "down_proj", "kernel"),
        _t(
            lambda c: (c.intermediate_size, c.hidden_size),
            lambda c: (c.hidden_size, c.intermediate_size),
        ),
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


def flax_to_hf_leaf(x: np.ndarray, tr: Transform, cfg: ModelConfig, dtype=None) -> np.ndarray:
    """Inverse of `hf_to_flax_leaf` (optionally casting to `dtype`)."""
    hf = tr.hf_shape(cfg)
    dtype = np.dtype(dtype or x.dtype)
    if tr.transpose:
        out = np.empty(hf, dtype)
        _copy_transposed(out, np.asarray(x).reshape(hf[::-1]))
        return out
    return np.ascontiguousarray(x.reshape(hf)).astype(dtype, copy=False)


def _set(tree: dict, path: tuple[str, ...], value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def unused_gate_names(cfg: ModelConfig, names, shapes: Mapping[str, tuple] | None = None):
    """The `model.gate_projections.*` tensors a loop_num=1 checkpoint of the official
    `IQuestLoopCoderForCausalLM` class carries (it creates the gates whatever loop_num is), when
    they have exactly this config's gate names and shapes; loop 0 never reads them."""
    if cfg.loop_num != 1 or not cfg.is_released_architecture:
        return set()
    with_gate = cfg.replace(loop_num=2)
    gates = {
        name.format(i=i): tr.hf_shape(with_gate)
        for name, _, tr in _GATE_ROWS
        for i in range(cfg.num_hidden_layers)
    }
    found = {n for n in names if n.startswith("model.gate_projections.")}
    if not found or not found <= set(gates):
        return set()
    if shapes is not None and any(tuple(shapes[n]) != gates[n] for n in found):
        return set()
    return found


def check_names(cfg: ModelConfig, names, shapes: Mapping[str, tuple] | None = None):
    """Raises `CheckpointError` naming missing/unexpected tensors and shape mismatches.

    A loop_num=1 checkpoint's unused gate tensors (`unused_gate_names`) are accepted with a note.
    """
    expected = expected_hf_shapes(cfg)
    names = set(names)
    unused = unused_gate_names(cfg, names, shapes)
    if unused:
        log.warning(
            "note: %d model.gate_projections.* tensors skipped: the gates are unused at "
            "loop_num 1 (the official class writes them anyway).",
            len(unused),
        )
        names -= unused
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


# ============================================================================ file conversion
# Everything below streams: tensors are read into (and written from) buffers of one layer slab
# at a time, never the whole model. See docs/conversion.md for the user guide.

DTYPE_NAMES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_WEIGHT_CODES = ("F32", "BF16", "F16")


def _as_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(
                f"dtype {dtype!r} is not supported; use one of {list(DTYPE_NAMES)}."
            )
        return DTYPE_NAMES[dtype]
    out = np.dtype(dtype)
    if out not in DTYPE_NAMES.values():
        raise CheckpointError(f"dtype {out} is not supported; use one of {list(DTYPE_NAMES)}.")
    return out


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _bits(x: np.ndarray) -> np.ndarray:
    """Same-size unsigned view: numpy copies ml_dtypes' bf16 through a slow generic loop."""
    return x.view(f"u{x.dtype.itemsize}")


def _copy_transposed(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[j, i] = src[i, j] for 2-D arrays, in cache-sized tiles (4-5x numpy's plain `.T`
    copy on large matrices, which walks one side with a stride of a whole row)."""
    if dst.dtype == src.dtype:
        dst, src = _bits(dst), _bits(src)
    tile = 256 if src.dtype.itemsize <= 2 else 128
    rows, cols = src.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            np.copyto(
                dst[j : j + tile, i : i + tile], src[i : i + tile, j : j + tile].T, casting="unsafe"
            )


def _fill_flax(dst: np.ndarray, x: np.ndarray, tr: Transform) -> None:
    """Writes HF tensor `x` into the Flax-layout buffer `dst` (casting), without a temporary."""
    if tr.transpose:
        _copy_transposed(dst.reshape(x.shape[::-1]), x)
    elif dst.dtype == x.dtype:
        np.copyto(_bits(dst).reshape(x.shape), _bits(x))
    else:
        np.copyto(dst.reshape(x.shape), x, casting="unsafe")


def _leaf_rows(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, Transform, bool]]:
    """Flax leaf path -> (HF name, transform, stacked) for every leaf `cfg` has."""
    out = {path: (name, tr, False) for name, path, tr in global_rows(cfg)}
    out.update({("layers", *path): (name, tr, True) for name, path, tr in layer_rows(cfg)})
    return out


def hf_tensor_order(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes in the order transformers' `save_pretrained` writes them."""
    shapes = expected_hf_shapes(cfg)
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        names += [name.format(i=i) for name, _, _ in _LAYER_ROWS]
    names.append("model.norm.weight")
    if cfg.has_gate:
        for i in range(cfg.num_hidden_layers):
            names += [name.format(i=i) for name, _, _ in _GATE_ROWS]
    if not cfg.tie_word_embeddings:
        names.append(_LM_HEAD_ROW[0])
    return [(n, shapes[n]) for n in names]


def open_hf_checkpoint(path: str | os.PathLike, *, allow_mixed: bool = False):
    """Validates a HF checkpoint directory without reading any weights.

    Checks config.json, every safetensors header and the index, that the tensor names and shapes
    are exactly those config.json implies, and that the weights are float and (unless
    `allow_mixed`, used when the caller casts everything anyway) all of one dtype.
    Returns:
      (ModelConfig, `safetensors_io.TensorReader`, stored numpy dtype: the widest one).
    Raises:
      CheckpointError naming the file/tensor and the fix.
    """
    path = os.fspath(path)
    cfg_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_file = os.path.join(cfg_dir, "config.json")
    try:
        if os.path.isfile(path) and path.endswith(sio.PICKLE_SUFFIXES):
            sio.find_weight_files(path)  # raises the pickle refusal
        if os.path.lexists(cfg_file):
            sio.checked_member(cfg_dir, "config.json")
        if not os.path.exists(cfg_file):
            raise CheckpointError(
                f"No config.json next to the weights in {cfg_dir}: download it with the weights "
                "(it defines the architecture)."
            )
        try:
            cfg = ModelConfig.from_hf(cfg_file)
        except ConfigError as e:
            if "Unknown config keys" not in str(e):
                raise CheckpointError(f"{cfg_file}: {e}") from None
            # Newer transformers add bookkeeping keys; the tensor shape check below still
            # catches a config that does not describe these weights.
            warnings.warn(f"{e} They are ignored for conversion.", stacklevel=2)
            cfg = ModelConfig.from_hf(cfg_file, strict=False)
        reader = sio.open_checkpoint(path)
    except sio.SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    infos = reader.infos
    try:
        check_names(cfg, infos.keys(), {n: i.shape for n, i in infos.items()})
    except CheckpointError as e:
        reader.close()
        raise CheckpointError(f"{path}: {e} (config: {cfg_file})") from None
    codes: dict[str, list[str]] = {}
    for name, info in infos.items():
        codes.setdefault(info.dtype, []).append(name)
    bad = {c: n for c, n in codes.items() if c not in _WEIGHT_CODES}
    if bad or (len(codes) > 1 and not allow_mixed):
        reader.close()
        rare = sorted(codes, key=lambda c: len(codes[c]))[0]
        where = bad or {rare: codes[rare]}
        c, names = next(iter(where.items()))
        raise CheckpointError(
            f"{path}: tensor {sorted(names)[0]!r} ({infos[sorted(names)[0]].file}) has dtype {c}"
            + (f" while the others are {sorted(set(codes) - {c})}" if len(codes) > 1 else "")
            + f". Weights must be one of {list(_WEIGHT_CODES)}"
            + ("" if bad else ", all the same unless you cast them all with --dtype")
            + ": re-export the checkpoint in a single float dtype."
        )
    stored = max((sio.DTYPES[c] for c in codes), key=lambda d: d.itemsize)
    return cfg, reader, stored


def _hf_pieces(cfg: ModelConfig, reader, dtype: np.dtype, piece_bytes: int | None):
    """Yields (leaf path, start layer or None, Flax-layout piece, full leaf shape).

    Stacked leaves come as slabs of whole layers of at most `piece_bytes` (None: the whole leaf).
    """
    for name, path, tr in global_rows(cfg):
        x = reader.read(name)
        leaf = np.empty(tr.flax_shape(cfg), dtype)
        _fill_flax(leaf, x, tr)
        del x
        yield path, None, leaf, leaf.shape
    L = cfg.num_hidden_layers
    for name, path, tr in layer_rows(cfg):
        full = (L, *tr.flax_shape(cfg))
        step = (
            L if piece_bytes is None else ckpt.layers_per_piece(full, dtype.itemsize, piece_bytes)
        )
        for start in range(0, L, step):
            piece = np.empty((min(step, L - start), *full[1:]), dtype)
            for j in range(piece.shape[0]):
                _fill_flax(piece[j], reader.read(name.format(i=start + j)), tr)
            yield ("layers", *path), start, piece, full


def load_hf_checkpoint(path: str | os.PathLike, dtype=None) -> tuple[ModelConfig, dict]:
    """Reads a HF (official names, safetensors) checkpoint into a stacked Flax params tree.

    Args:
      path: directory with config.json and model.safetensors or shards + index (or one
        .safetensors file with config.json beside it). Pickle files are refused.
      dtype: "float32" / "bfloat16" / "float16" or None to keep the stored dtype (bf16 stays
        bf16).
    Returns:
      (ModelConfig, params) with numpy leaves in the layout of `LoopCoder`'s params.
    """
    dtype = _as_dtype(dtype)
    cfg, reader, stored = open_hf_checkpoint(path, allow_mixed=dtype is not None)
    dtype = dtype or stored
    params: dict = {}
    with reader:
        for leaf_path, _, leaf, _ in _hf_pieces(cfg, reader, dtype, None):
            _set(params, leaf_path, leaf)
    return cfg.replace(torch_dtype=_dtype_name(dtype)), params


class _Progress:
    """tqdm over bytes (or a silent stand-in) + the numbers for the summary line."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.start = time.perf_counter()
        self.tensors = 0
        self.bytes = 0
        self.bar = tqdm.tqdm(
            total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, leave=False
        )

    def update(self, name: str, nbytes: int, tensors: int):
        self.tensors += tensors
        self.bytes += nbytes
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(nbytes)

    def summary(self, **extra) -> dict:
        self.bar.close()
        secs = time.perf_counter() - self.start
        out = {
            "tensors": self.tensors,
            "bytes": self.bytes,
            "seconds": round(secs, 3),
            "MB_per_s": round(self.bytes / 1e6 / max(secs, 1e-9), 1),
        }
        out.update(extra)
        return out


def hf_to_orbax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype=None,
    overwrite: bool = False,
    piece_bytes: int = ckpt.DEFAULT_GROUP_BYTES,
    progress: bool = False,
) -> dict:
    """Converts a HF checkpoint to a params-only Orbax checkpoint, one layer slab at a time.

    The output is what `checkpoint.load_params` (`train.py --init-from`, `infer.py
    --checkpoint`) reads, onto any mesh. Returns the summary (tensors, bytes, seconds, MB/s).
    """
    check_destination(dst)
    dtype = _as_dtype(dtype)
    cfg, reader, stored = open_hf_checkpoint(src, allow_mixed=dtype is not None)
    dtype = dtype or stored
    cfg = cfg.replace(torch_dtype=_dtype_name(dtype))
    total = sum(reader.infos[n].nbytes for n in expected_hf_shapes(cfg))
    bar = _Progress(total, "hf-to-orbax", progress)
    with reader, ckpt.ParamsWriter(dst, cfg, overwrite=overwrite, group_bytes=piece_bytes) as w:
        for leaf_path, start, piece, full in _hf_pieces(cfg, reader, dtype, piece_bytes):
            w.add(leaf_path, piece, shape=full, start=start)
            n = 1 if start is None else piece.shape[0]
            read = piece.size * stored.itemsize
            bar.update("/".join(leaf_path), read, n)
        # The tokenizer and generation defaults travel with the weights (hf_export).
        src_dir = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
        hf_export.copy_tokenizer_files(src_dir, w.tmp)
    return bar.summary(src=os.fspath(src), dst=w.path, dtype=_dtype_name(dtype))


def check_destination(dst: str | os.PathLike) -> None:
    """Refuses a DST that exists but is not a directory, before anything is read or written
    (`--overwrite` replaces an earlier output directory, never some other file)."""
    dst = os.fspath(dst)
    if os.path.islink(dst) or (os.path.lexists(dst) and not os.path.isdir(dst)):
        raise CheckpointError(
            f"{dst} is a file or link, not an output directory; --overwrite only replaces a "
            "directory this tool wrote. Remove it or pick another destination."
        )


def _write_hf(
    cfg, dst, pieces, out_dtypes, max_shard_size, overwrite, bar, tokenizer_dir=None
) -> list[str]:
    """Writes shards + index + config.json (with `auto_map` for loop models) +
    generation_config.json (+ the tokenizer files from `tokenizer_dir`) from a stream of
    (leaf path, start, Flax piece); every file mode 0644. Returns the weight file names."""
    rows = _leaf_rows(cfg)
    by_name = {}
    for leaf_path, (name, _, stacked) in rows.items():
        if stacked:
            for i in range(cfg.num_hidden_layers):
                by_name[name.format(i=i)] = leaf_path
        else:
            by_name[name] = leaf_path
    specs = [(n, s, out_dtypes[by_name[n]]) for n, s in hf_tensor_order(cfg)]
    planned, headers = sio.plan_shards(specs, max_shard_size)
    with ckpt.atomic_directory(dst, overwrite=overwrite) as tmp:
        writer = sio.ShardWriter(tmp, planned, headers)
        try:
            for leaf_path, start, piece in pieces:
                if leaf_path not in rows:
                    raise CheckpointError(f"leaf {'/'.join(leaf_path)} has no HF name for {cfg}")
                name, tr, stacked = rows[leaf_path]
                out = out_dtypes[leaf_path]
                if not stacked:
                    writer.write(name, flax_to_hf_leaf(np.asarray(piece), tr, cfg, out))
                    bar.update(name, writer.planned[name].nbytes, 1)
                    continue
                for j in range(piece.shape[0]):
                    hf_name = name.format(i=start + j)
                    x = flax_to_hf_leaf(np.asarray(piece[j]), tr, cfg, out)
                    writer.write(hf_name, x)
                    bar.update(hf_name, x.nbytes, 1)
            files = writer.finish()
        finally:
            writer.close()
        out_cfg = cfg.to_hf()
        dts = {np.dtype(d).name for d in out_dtypes.values()}
        out_cfg["torch_dtype"] = dts.pop() if len(dts) == 1 else cfg.torch_dtype
        if hf_export.auto_map(cfg) is not None:
            out_cfg["auto_map"] = hf_export.auto_map(cfg)
        ckpt.write_json_atomic(os.path.join(tmp, "config.json"), out_cfg)
        hf_export.write_extras(tmp, cfg, tokenizer_dir)
        for name in os.listdir(tmp):  # an export is for others to read
            os.chmod(os.path.join(tmp, name), 0o644)
    return files


def save_hf_checkpoint(
    cfg: ModelConfig,
    params,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    *,
    dtype=None,
    overwrite: bool = False,
    tokenizer: str | os.PathLike | None = None,
) -> list[str]:
    """Writes `params` as a HF checkpoint (official names, [out, in] layout, safetensors).

    Also writes generation_config.json and, given `tokenizer` (a tokenizer.model or a directory
    holding one, with its HF tokenizer files), the tokenizer files (see `hf_export`).

    `architectures` is IQuestLoopCoderForCausalLM, or LlamaForCausalLM for a dense model
    (loop_num == 1, no gate tensors). Shards of at most `max_shard_size` plus
    model.safetensors.index.json when more than one. Stacked leaves are copied to host one layer
    at a time. Returns the weight file names.
    """
    check_destination(path)
    dtype = _as_dtype(dtype)
    rows = _leaf_rows(cfg)
    pieces, out_dtypes = [], {}
    for leaf_path in rows:
        try:
            leaf = _get(params, leaf_path)
        except (KeyError, TypeError):
            raise CheckpointError(f"params have no leaf {'/'.join(leaf_path)} for {cfg}") from None
        _, tr, stacked = rows[leaf_path]
        want = (cfg.num_hidden_layers, *tr.flax_shape(cfg)) if stacked else tr.flax_shape(cfg)
        if tuple(leaf.shape) != tuple(want):
            raise CheckpointError(
                f"params leaf {'/'.join(leaf_path)} has shape {tuple(leaf.shape)} but the config "
                f"implies {tuple(want)}; pass the ModelConfig these params were made with."
            )
        out_dtypes[leaf_path] = dtype or np.dtype(leaf.dtype)
        pieces.append((leaf_path, 0 if leaf_path[0] == "layers" else None, leaf))
    bar = _Progress(0, "save-hf", False)
    tok_dir = hf_export.find_tokenizer_dir(tokenizer)
    if tokenizer is not None and tok_dir is None:
        raise CheckpointError(f"tokenizer {os.fspath(tokenizer)}: no tokenizer.model there.")
    return _write_hf(cfg, path, pieces, out_dtypes, max_shard_size, overwrite, bar, tok_dir)


def orbax_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype=None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
    tokenizer: str | os.PathLike | None = None,
) -> dict:
    """Converts a params checkpoint or a training run dir (its latest step) to a self-contained
    HF checkpoint, streaming: one Orbax group (params checkpoint) or one layer slab of at most
    `checkpoint.DEFAULT_GROUP_BYTES` (run dir) at a time.

    tokenizer: a tokenizer.model or a directory holding one (with its HF tokenizer files);
    default: the one in `src`, if any. Returns the summary (tensors, bytes, seconds, MB/s).
    """
    check_destination(dst)
    src = os.fspath(src)
    dtype = _as_dtype(dtype)
    tok_dir = hf_export.find_tokenizer_dir(tokenizer if tokenizer is not None else src)
    if tokenizer is not None and tok_dir is None:
        raise CheckpointError(f"--tokenizer {os.fspath(tokenizer)}: no tokenizer.model there.")
    if tok_dir is None:
        log.warning(
            "note: %s has no tokenizer.model: the export gets weights, config.json and "
            "generation_config.json only; pass --tokenizer to include the tokenizer.",
            src,
        )
    cfg = ckpt.load_config(src)
    rows = _leaf_rows(cfg)
    stored, pieces = _orbax_pieces(src, cfg)
    if set(stored) != set(rows):
        raise CheckpointError(
            f"{src}: leaves {sorted('/'.join(p) for p in set(stored) ^ set(rows))} do not match "
            "its config.json; re-create the checkpoint."
        )
    out_dtypes = {p: dtype or d for p, (_, d) in stored.items()}
    total = sum(int(np.prod(s)) * out_dtypes[p].itemsize for p, (s, _) in stored.items())
    bar = _Progress(total, "orbax-to-hf", progress)
    files = _write_hf(cfg, dst, pieces, out_dtypes, max_shard_size, overwrite, bar, tok_dir)
    return bar.summary(src=src, dst=os.path.abspath(os.fspath(dst)), shards=len(files))


def _orbax_pieces(src: str, cfg: ModelConfig):
    """({leaf path: (shape, stored dtype)}, iterator of (leaf path, start, numpy piece))."""
    manifest = ckpt.read_manifest(src)
    if manifest is not None:  # a params checkpoint: its own pieces, group by group
        stored = {
            tuple(k.split("/")): (tuple(v["shape"]), np.dtype(v["dtype"]))
            for k, v in manifest["leaves"].items()
        }
        return stored, ckpt.iter_param_pieces(src)
    item = ckpt.resolve_params_item(src)  # a training run's latest step: one Orbax tree
    try:
        return checkpoint_stream.tree_leaves(item), checkpoint_stream.iter_tree_pieces(item)
    except checkpoint_stream.UnsupportedLayout:  # an older single-tree layout: load it whole
        _, params = ckpt.load_params(src)
        flat = [(p, np.asarray(x)) for p, x in ckpt._leaves_with_paths(params)]
        stored = {p: (x.shape, x.dtype) for p, x in flat}
        return stored, ((p, 0 if p[0] == "layers" else None, x) for p, x in flat)


# ============================================================================ dense -> loop fold
# The LoopCoder report initialises a loop model from a dense checkpoint. Each strategy maps
# output layer i of the L-layer shared stack to the dense layers whose (float32) mean it takes;
# D is the dense depth and k = D // L.
def _fold_first(dense_layers: int, num_layers: int) -> list[list[int]]:
    return [[i] for i in range(num_layers)]


def _fold_average(dense_layers: int, num_layers: int) -> list[list[int]]:
    k = dense_layers // num_layers
    return [[i + j * num_layers for j in range(k)] for i in range(num_layers)]


def _fold_average_adjacent(dense_layers: int, num_layers: int) -> list[list[int]]:
    k = dense_layers // num_layers
    return [[i * k + j for j in range(k)] for i in range(num_layers)]


def _fold_stride(dense_layers: int, num_layers: int) -> list[list[int]]:
    k = dense_layers // num_layers
    return [[i * k] for i in range(num_layers)]


FOLD_STRATEGIES = {
    # layers 0..L-1 (the bottom of the dense stack); the top D-L layers are dropped.
    "first": _fold_first,
    # layer i = mean of layers i, i+L, ..., i+(k-1)L: each position of the loop averages the
    # dense layers that a k-times-looped L stack would run at that depth (needs L | D).
    "average": _fold_average,
    # layer i = mean of the k consecutive layers k*i .. k*i+k-1 (needs L | D).
    "average-adjacent": _fold_average_adjacent,
    # layer i = layer k*i: every k-th layer (needs L | D).
    "stride": _fold_stride,
}


def fold_sources(strategy: str, dense_layers: int, num_layers: int) -> list[list[int]]:
    """For each of the `num_layers` output layers, the dense layer indices it averages."""
    if strategy not in FOLD_STRATEGIES:
        raise CheckpointError(
            f"Unknown fold strategy {strategy!r}; choose {list(FOLD_STRATEGIES)}."
        )
    if not 1 <= num_layers <= dense_layers:
        raise CheckpointError(
            f"num_layers={num_layers} must be between 1 and the dense depth {dense_layers}."
        )
    if strategy != "first" and dense_layers % num_layers:
        raise CheckpointError(
            f"strategy {strategy!r} needs num_layers ({num_layers}) to divide the dense depth "
            f"({dense_layers}); pick a divisor or use strategy 'first'."
        )
    return FOLD_STRATEGIES[strategy](dense_layers, num_layers)


def _mean_layers(layers: list[np.ndarray], dtype) -> np.ndarray:
    if len(layers) == 1:
        return layers[0].astype(dtype, copy=False)
    acc = np.zeros(layers[0].shape, np.float32)
    for x in layers:
        acc += x.astype(np.float32)
    return (acc / len(layers)).astype(dtype)


def _folded_config(dense_cfg: ModelConfig, num_layers, loop_num, loop_window_size) -> ModelConfig:
    if dense_cfg.has_gate:
        raise CheckpointError(
            f"the source has loop_num={dense_cfg.loop_num} (gate tensors): fold needs a dense "
            "(loop_num=1) checkpoint."
        )
    return dense_cfg.replace(
        num_hidden_layers=num_layers,
        loop_num=loop_num,
        loop_window_size=loop_window_size or dense_cfg.loop_window_size,
    )


def _gate_leaves(cfg: ModelConfig, gate_init: float, dtype):
    """Gate params of a fresh loop model: Wg = 0, bg = gate_init, so g = sigmoid(gate_init)."""
    L, n, h = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    return {
        ("layers", "self_attn", "loop_gate", "kernel"): np.zeros((L, n, h), dtype),
        ("layers", "self_attn", "loop_gate", "bias"): np.full((L, n), gate_init, dtype),
    }


def fold_dense_to_loop(
    dense_cfg: ModelConfig,
    dense_params,
    strategy: str,
    num_layers: int,
    loop_num: int = 2,
    gate_init: float = 0.0,
    loop_window_size: int | None = None,
) -> tuple[ModelConfig, dict]:
    """Initialises a loop model from dense (loop_num=1) params (see `FOLD_STRATEGIES`).

    Embedding, final norm and lm_head are copied. Gate weights start at 0 and biases at
    `gate_init`, so every head starts with g = sigmoid(gate_init) (0.0 -> 0.5, the official
    init: an even mix of global and local attention). Returns (loop ModelConfig, numpy params).
    """
    cfg = _folded_config(dense_cfg, num_layers, loop_num, loop_window_size)
    sources = fold_sources(strategy, dense_cfg.num_hidden_layers, num_layers)
    out: dict = {}
    for leaf_path, (_, _, stacked) in _leaf_rows(dense_cfg).items():
        leaf = np.asarray(_get(dense_params, leaf_path))
        if stacked:
            leaf = np.stack([_mean_layers([leaf[j] for j in src], leaf.dtype) for src in sources])
        _set(out, leaf_path, leaf)
    if cfg.has_gate:
        dtype = np.asarray(_get(dense_params, ("norm", "scale"))).dtype
        for leaf_path, leaf in _gate_leaves(cfg, gate_init, dtype).items():
            _set(out, leaf_path, leaf)
    return cfg, out


def fold_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    strategy: str,
    num_layers: int,
    loop_num: int = 2,
    gate_init: float = 0.0,
    loop_window_size: int | None = None,
    dtype=None,
    overwrite: bool = False,
    piece_bytes: int = ckpt.DEFAULT_GROUP_BYTES,
    progress: bool = False,
) -> dict:
    """`fold_dense_to_loop` from a dense HF checkpoint to an Orbax params checkpoint, streaming.

    Reads only the dense layers each output slab needs. A params-only Orbax source is loaded
    whole (host memory = the dense model), then folded.
    """
    check_destination(dst)
    src = os.fspath(src)
    orbax_src = storage.exists(storage.join(src, ckpt.PARAMS_ITEM)) or ckpt.finished_steps(src)
    if orbax_src:  # a params checkpoint or a training run dir (its latest step)
        dense_cfg, params = ckpt.load_params(src)
        cfg, folded = fold_dense_to_loop(
            dense_cfg,
            jax_to_numpy(params),
            strategy,
            num_layers,
            loop_num,
            gate_init,
            loop_window_size,
        )
        if dtype is not None:
            cfg = cfg.replace(torch_dtype=_dtype_name(_as_dtype(dtype)))
        start = time.perf_counter()
        ckpt.save_params(dst, cfg, _cast_tree(folded, _as_dtype(dtype)), overwrite=overwrite)
        return {"seconds": round(time.perf_counter() - start, 3), "dst": storage.resolve(dst)}
    dtype = _as_dtype(dtype)
    dense_cfg, reader, stored = open_hf_checkpoint(src, allow_mixed=dtype is not None)
    dtype = dtype or stored
    cfg = _folded_config(dense_cfg, num_layers, loop_num, loop_window_size)
    cfg = cfg.replace(torch_dtype=_dtype_name(dtype))
    sources = fold_sources(strategy, dense_cfg.num_hidden_layers, num_layers)
    total = sum(reader.infos[n].nbytes for n in expected_hf_shapes(dense_cfg))
    bar = _Progress(total, "fold", progress)
    with reader, ckpt.ParamsWriter(dst, cfg, overwrite=overwrite, group_bytes=piece_bytes) as w:
        for name, path, tr in global_rows(cfg):
            leaf = np.empty(tr.flax_shape(cfg), dtype)
            _fill_flax(leaf, reader.read(name), tr)
            w.add(path, leaf, shape=leaf.shape)
            bar.update(name, leaf.size * stored.itemsize, 1)
        for name, path, tr in _LAYER_ROWS:
            full = (num_layers, *tr.flax_shape(cfg))
            step = ckpt.layers_per_piece(full, dtype.itemsize, piece_bytes)
            for start in range(0, num_layers, step):
                piece = np.empty((min(step, num_layers - start), *full[1:]), dtype)
                for j in range(piece.shape[0]):
                    layers = []
                    for d in sources[start + j]:
                        x = np.empty(full[1:], stored)
                        _fill_flax(x, reader.read(name.format(i=d)), tr)
                        layers.append(x)
                    piece[j] = _mean_layers(layers, dtype)
                    bar.update(name, sum(x.nbytes for x in layers), len(layers))
                w.add(("layers", *path), piece, shape=full, start=start)
        if cfg.has_gate:
            for leaf_path, leaf in _gate_leaves(cfg, gate_init, dtype).items():
                w.add(leaf_path, leaf, shape=leaf.shape, start=0)
    return bar.summary(src=src, dst=w.path, strategy=strategy, sources=sources)


def jax_to_numpy(tree):
    """Host numpy copy of a params tree (leaf by leaf)."""
    if isinstance(tree, Mapping):
        return {k: jax_to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _cast_tree(tree, dtype):
    if dtype is None:
        return tree
    if isinstance(tree, Mapping):
        return {k: _cast_tree(v, dtype) for k, v in tree.items()}
    return np.asarray(tree).astype(dtype)


# ============================================================================ CLI
def build_parser():
    """The `python -m loopcoder_jax.convert` command line (every option shows its default)."""
    import argparse

    from loopcoder_jax.cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="python -m loopcoder_jax.convert",
        description="Convert LoopCoder / IQuest-Coder weights between Hugging Face safetensors "
        "and loopcoder-jax Orbax params checkpoints (no torch needed). See docs/conversion.md.",
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, dst_kind):
        sp.add_argument("src", help="input checkpoint directory")
        sp.add_argument("dst", help=f"output directory ({dst_kind}); must not exist")
        sp.add_argument(
            "--dtype",
            choices=list(DTYPE_NAMES),
            default=None,
            help="cast the weights (default: keep the stored dtype)",
        )
        sp.add_argument("--overwrite", action="store_true", help="replace an existing DST")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    a = sub.add_parser(
        "hf-to-orbax", help="HF safetensors dir -> Orbax params checkpoint",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    common(a, "Orbax params checkpoint")
    a.add_argument(
        "--piece-mb",
        type=int,
        default=ckpt.DEFAULT_GROUP_BYTES >> 20,
        help="host memory per write: layer slabs saved in Orbax groups of this size",
    )
    b = sub.add_parser(
        "orbax-to-hf", help="Orbax params checkpoint -> HF safetensors dir",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    common(b, "HF checkpoint")
    b.add_argument(
        "--max-shard-size", default="5GB", help='largest safetensors shard, e.g. "5GB", "500MB"'
    )
    b.add_argument(
        "--tokenizer",
        help="tokenizer.model (or a dir holding it with its HF tokenizer files) to export "
        "(default: the one in SRC)",
    )
    f = sub.add_parser(
        "fold", help="dense checkpoint (HF or Orbax) -> loop model (Orbax)",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    common(f, "Orbax params checkpoint")
    f.add_argument(
        "--strategy", choices=list(FOLD_STRATEGIES), required=True,
        help="how dense layers become the shared stack (docs/conversion.md)",
    )  # fmt: skip
    f.add_argument("--num-layers", type=int, required=True, help="layers L of the shared stack")
    f.add_argument("--loop-num", type=int, default=2, help="loops of the folded model")
    f.add_argument(
        "--gate-init",
        type=float,
        default=0.0,
        help="initial gate bias: g = sigmoid(gate_init); 0 = official init (0.5)",
    )
    f.add_argument(
        "--loop-window-size", type=int, default=None,
        help="local window W of the loop model (default: the dense config's loop_window_size)",
    )  # fmt: skip
    f.add_argument(
        "--piece-mb", type=int, default=ckpt.DEFAULT_GROUP_BYTES >> 20,
        help="host memory per write: layer slabs saved in Orbax groups of this size",
    )  # fmt: skip
    return p


def main(argv=None) -> int:
    """Console entry point (`loopcoder-convert`, `python -m loopcoder_jax.convert`)."""
    import json
    import sys

    from loopcoder_jax.data.tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    try:
        if args.command == "hf-to-orbax":
            out = hf_to_orbax(
                args.src,
                args.dst,
                dtype=args.dtype,
                overwrite=args.overwrite,
                piece_bytes=args.piece_mb << 20,
                progress=progress,
            )
        elif args.command == "orbax-to-hf":
            out = orbax_to_hf(
                args.src,
                args.dst,
                dtype=args.dtype,
                overwrite=args.overwrite,
                max_shard_size=args.max_shard_size,
                progress=progress,
                tokenizer=args.tokenizer,
            )
        else:
            out = fold_checkpoint(
                args.src,
                args.dst,
                strategy=args.strategy,
                num_layers=args.num_layers,
                loop_num=args.loop_num,
                gate_init=args.gate_init,
                loop_window_size=args.loop_window_size,
                dtype=args.dtype,
                overwrite=args.overwrite,
                piece_bytes=args.piece_mb << 20,
                progress=progress,
            )
    except (
        CheckpointError,
        ConfigError,
        FileExistsError,
        FileNotFoundError,
        TokenizerError,
        storage.RemoteStorageError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
