"""Every checkpoint write and read goes through here (Orbax).

Params-only checkpoint (what the converter writes, and what `train.py --init-from` and
`infer.py --checkpoint` read), a directory:
    DIR/config.json     the HF-shaped ModelConfig (`ModelConfig.to_hf()`)
    DIR/params/         an Orbax StandardCheckpointer tree of the Flax `params`
The directory is assembled under a temporary name and renamed into place at the end, so a
crash never leaves a `DIR` that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import linen as nn

from loopcoder_jax.config import ModelConfig, RuntimeConfig

PARAMS_ITEM = "params"
CONFIG_FILE = "config.json"


class CheckpointNotFoundError(FileNotFoundError):
    """No usable checkpoint at the given path; the message says what was looked for."""


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Writes JSON via a temp file + rename, so readers never see a half-written file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def abstract_params(cfg: ModelConfig, runtime: RuntimeConfig | None = None, boxed=False):
    """Shapes/dtypes of the params tree without allocating it (`jax.eval_shape` of init)."""
    runtime = runtime or RuntimeConfig()
    from loopcoder_jax.model import LoopCoder  # local: model imports stay out of I/O paths

    model = LoopCoder(cfg, runtime)
    ids = jnp.zeros((1, 1), jnp.int32)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
    return tree if boxed else nn.unbox(tree)


def save_params(path: str | os.PathLike, cfg: ModelConfig, params, *, overwrite=False) -> str:
    """Writes a params-only checkpoint atomically; returns the absolute directory path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True or pick a new path.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_ITEM), params)
        checkpointer.wait_until_finished()
        write_json_atomic(os.path.join(tmp, CONFIG_FILE), cfg.to_hf())
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored with a params checkpoint."""
    cfg_path = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise CheckpointNotFoundError(
            f"No {CONFIG_FILE} in {os.fspath(path)}: not a loopcoder-jax params checkpoint "
            "(write one with `python -m loopcoder_jax.convert hf-to-orbax` or train.py)."
        )
    return ModelConfig.from_hf(cfg_path)


def load_params(
    path: str | os.PathLike,
    *,
    dtype=None,
    shardings=None,
) -> tuple[ModelConfig, dict]:
    """Restores a params-only checkpoint.

    Args:
      path: the checkpoint directory (contains config.json and params/).
      dtype: optional dtype to restore every leaf as (e.g. "bfloat16").
      shardings: optional pytree of `jax.sharding.Sharding` matching the params, to restore
        straight onto a mesh (any mesh: Orbax reshards). Default: the first local device.
    Returns:
      (ModelConfig, params)
    """
    path = os.path.abspath(os.fspath(path))
    cfg = load_config(path)
    item = os.path.join(path, PARAMS_ITEM)
    if not os.path.isdir(item):
        raise CheckpointNotFoundError(f"{path} has {CONFIG_FILE} but no {PARAMS_ITEM}/ directory.")
    target = abstract_params(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, target)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(
            x.shape, jnp.dtype(dtype) if dtype else x.dtype, sharding=s
        ),
        target,
        shardings,
    )
    params = ocp.StandardCheckpointer().restore(item, target)
    return cfg, params
