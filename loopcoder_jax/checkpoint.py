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


def abstract_params(cfg: ModelConfig, runtime: RuntimeConfig = RuntimeConfig(), boxed=False):
    """Shapes/dtypes of the params tree without allocating it (`jax.eval_shape` of init)."""
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
      path: a params checkpoint directory (config.json + params/), or a training run
        directory (config.json + checkpoints/<step>/params/: the latest step is loaded).
      dtype: optional dtype to restore every leaf as (e.g. "bfloat16").
      shardings: optional pytree of `jax.sharding.Sharding` matching the params, to restore
        straight onto a mesh (any mesh: Orbax reshards). Default: the first local device.
    Returns:
      (ModelConfig, params)
    """
    path = os.path.abspath(os.fspath(path))
    cfg = load_config(path)
    item = resolve_params_item(path)
    if not os.path.isdir(item):
        raise CheckpointNotFoundError(f"{path} has {CONFIG_FILE} but no {PARAMS_ITEM}/ directory.")
    target = abstract_params(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, target)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype) if dtype else x.dtype, sharding=s),
        target,
        shardings,
    )
    params = ocp.StandardCheckpointer().restore(item, target)
    return cfg, params


# ---------------------------------------------------------------------------- training runs
CHECKPOINTS_DIR = "checkpoints"
OPT_STATE_ITEM = "opt_state"
DATA_ITEM = "data"
META_ITEM = "meta"


def finished_steps(run_dir: str | os.PathLike) -> list[int]:
    """Committed checkpoint steps of a run, ascending.

    Orbax writes each step under a temporary name and renames it to `<step>` only once every
    item is written, so an integer-named directory is a complete checkpoint.
    """
    ckpt_dir = os.path.join(os.fspath(run_dir), CHECKPOINTS_DIR)
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def resolve_params_item(path: str) -> str:
    """The Orbax params directory of a params checkpoint or of a run dir's latest step."""
    direct = os.path.join(path, PARAMS_ITEM)
    if os.path.isdir(direct):
        return direct
    steps = finished_steps(path)
    if steps:
        return os.path.join(path, CHECKPOINTS_DIR, str(steps[-1]), PARAMS_ITEM)
    raise CheckpointNotFoundError(
        f"{path} has {CONFIG_FILE} but neither a {PARAMS_ITEM}/ directory (params checkpoint) "
        f"nor a finished {CHECKPOINTS_DIR}/<step>/ (training run). Was the run killed before "
        "its first checkpoint?"
    )


class _FrozenIteratorState:
    """The data iterator's state captured at save time.

    Saves may finish asynchronously while training (and the iterator) moves on; grain's
    handler would read the live iterator's state too late.
    """

    def __init__(self, iterator):
        state = iterator.get_state()
        self._state = state if isinstance(state, bytes) else json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._state


class TrainCheckpointer:
    """Orbax `CheckpointManager` for a training run: RUN/checkpoints/<step>/{params,
    opt_state, data, meta}.

    params and opt_state are sharded Orbax trees (restorable onto any mesh: pass the target
    shardings), data is the grain iterator state (one file per process), meta is JSON (step,
    and anything the caller adds). Saves are asynchronous when `async_save`; at most `keep`
    steps are kept. Every process must call `save`/`restore` (collective in multi-host runs).
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(os.fspath(run_dir)), CHECKPOINTS_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a killed save are not checkpoints
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, data_iterator=None, meta=None) -> None:
        """Starts saving `state` (a TrainState) as `step`; returns before the write finishes."""
        import grain

        items = {
            PARAMS_ITEM: ocp.args.StandardSave(state.params),
            OPT_STATE_ITEM: ocp.args.StandardSave(state.opt_state),
            META_ITEM: ocp.args.JsonSave({"step": int(step), **(meta or {})}),
        }
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, *, data_iterator=None):
        """Restores `step` onto the shardings carried by `abstract_state`'s leaves.

        abstract_state: a TrainState of `jax.ShapeDtypeStruct`s with `.sharding` set (any
        mesh, not necessarily the one the checkpoint was written from).
        data_iterator: restored in place when given.
        Returns (TrainState, meta dict).
        """
        import grain

        items = {
            PARAMS_ITEM: ocp.args.StandardRestore(abstract_state.params),
            OPT_STATE_ITEM: ocp.args.StandardRestore(abstract_state.opt_state),
            META_ITEM: ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            step_dir = os.path.join(self.directory, str(step), DATA_ITEM)
            if not os.path.isdir(step_dir):
                raise CheckpointNotFoundError(
                    f"Checkpoint step {step} in {self.directory} has no data-iterator state; "
                    "it cannot resume the data stream exactly. Start a new run dir, or use "
                    "--init-from to start from its params."
                )
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = abstract_state.replace(
            step=jnp.asarray(step, jnp.int32),
            params=out[PARAMS_ITEM],
            opt_state=out[OPT_STATE_ITEM],
        )
        if hasattr(abstract_state.step, "sharding") and abstract_state.step.sharding is not None:
            state = state.replace(step=jax.device_put(state.step, abstract_state.step.sharding))
        return state, dict(out[META_ITEM])

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
