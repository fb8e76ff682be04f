"""Every checkpoint write and read goes through here (Orbax).

Params-only checkpoint (what the converter writes, and what `train.py --init-from` and
`infer.py --checkpoint` read), a directory:
    DIR/config.json     the HF-shaped ModelConfig (`ModelConfig.to_hf()`)
    DIR/params/         the Flax `params`: Orbax checkpoints of layer slabs + manifest.json
                        (see `ParamsWriter`: written one slab at a time, so converting a
                        model never needs it whole in host memory)
The directory is assembled under a temporary name and renamed into place at the end, so a
crash never leaves a `DIR` that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from loopcoder_jax import quiet_logs
from loopcoder_jax.config import ModelConfig, RuntimeConfig

quiet_logs.install()  # orbax's "Metadata file does not exist" on every item load (harmless)

PARAMS_ITEM = "params"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "loopcoder-jax/params-pieces/v1"
LAYERS_KEY = "layers"  # params subtree whose leaves are stacked [L, ...]
DEFAULT_GROUP_BYTES = 64 * 2**20  # host memory per Orbax write: ~3.5x this at peak


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


class ParamsWriter:
    """Streams a params-only checkpoint to disk one piece at a time (bounded host memory).

    Each stacked `[L, ...]` leaf is written as slabs of whole layers ("pieces"); pieces are
    packed into Orbax checkpoints ("groups") of about `group_bytes` each, saved as soon as a
    group is full. Peak host memory is therefore about one group plus Orbax's own working
    copies of it (~2.5x the bytes being saved, measured with orbax 0.12), however large a leaf
    is. The layout:
        DIR/config.json
        DIR/params/manifest.json   {leaf path: shape, dtype, [(group, key, start, stop)]}
        DIR/params/g00000/ ...     Orbax StandardCheckpointer trees {key: piece}
    Everything is written under a temporary directory renamed to DIR by `commit()`; an
    exception inside the `with` block removes it, so a DIR that exists is complete.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        cfg: ModelConfig,
        *,
        overwrite: bool = False,
        group_bytes: int = DEFAULT_GROUP_BYTES,
    ):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.exists(self.path) and not overwrite:
            raise FileExistsError(
                f"{self.path} already exists; pass overwrite=True (--overwrite) or pick a new path."
            )
        self.cfg = cfg
        self.group_bytes = group_bytes
        parent = os.path.dirname(self.path)
        # Multi-process (jax.distributed): every process writes its own shards into the SAME
        # directory, so the name cannot be random; the primary process owns the directory.
        self._primary = jax.process_index() == 0
        self._multi = jax.process_count() > 1
        suffix = "mp" if self._multi else uuid.uuid4().hex[:8]
        self.tmp = os.path.join(parent, f".{os.path.basename(self.path)}.tmp-{suffix}")
        if self._primary:
            os.makedirs(parent, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)  # a crashed earlier multi-process run
            os.makedirs(os.path.join(self.tmp, PARAMS_ITEM))
        self._sync("open")
        self.leaves: dict[str, dict] = {}
        self._group: dict[str, object] = {}
        self._group_nbytes = 0
        self._num_groups = 0
        self._checkpointer = ocp.StandardCheckpointer()
        self.bytes_written = 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        elif self._primary:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _sync(self, what: str):
        if self._multi:
            multihost_utils.sync_global_devices(f"loopcoder_jax.ParamsWriter.{what}:{self.path}")

    def add(self, leaf_path: tuple[str, ...], piece, *, shape, start: int | None = None):
        """Adds `piece` of the leaf at `leaf_path` (full shape `shape`).

        `start` is the first layer of a slab `piece = leaf[start:start + len(piece)]`; None
        means the piece is the whole (unstacked) leaf.
        """
        key = "/".join(leaf_path)
        entry = self.leaves.setdefault(
            key, {"shape": list(shape), "dtype": jnp.dtype(piece.dtype).name, "pieces": []}
        )
        if entry["dtype"] != jnp.dtype(piece.dtype).name:
            raise ValueError(f"{key}: pieces of one leaf must share a dtype")
        nbytes = int(piece.size) * jnp.dtype(piece.dtype).itemsize
        if self._group and self._group_nbytes + nbytes > self.group_bytes:
            self._flush()
        name = f"p{len(self._group)}"
        stop = None if start is None else start + int(piece.shape[0])
        entry["pieces"].append(
            {"group": self._group_name(), "key": name, "start": start, "stop": stop}
        )
        self._group[name] = piece
        self._group_nbytes += nbytes

    def _group_name(self) -> str:
        return f"g{self._num_groups:05d}"

    def _flush(self):
        if not self._group:
            return
        item = os.path.join(self.tmp, PARAMS_ITEM, self._group_name())
        self._checkpointer.save(item, self._group)
        self._checkpointer.wait_until_finished()
        self.bytes_written += self._group_nbytes
        self._group, self._group_nbytes = {}, 0
        self._num_groups += 1

    def commit(self) -> str:
        self._flush()
        self._sync("saved")
        if self._primary:
            self._finalize()
        self._sync("committed")
        return self.path

    def _finalize(self):
        try:
            for key, entry in self.leaves.items():
                covered = (
                    entry["pieces"][0]["start"] is None
                    or sum(p["stop"] - p["start"] for p in entry["pieces"]) == entry["shape"][0]
                )
                if not covered:
                    raise ValueError(f"{key}: the written layer slabs do not cover the leaf")
            manifest = {"format": MANIFEST_FORMAT, "leaves": self.leaves}
            write_json_atomic(os.path.join(self.tmp, PARAMS_ITEM, MANIFEST_FILE), manifest)
            write_json_atomic(os.path.join(self.tmp, CONFIG_FILE), self.cfg.to_hf())
            if os.path.exists(self.path):
                shutil.rmtree(self.path)
            os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                shutil.rmtree(self.tmp, ignore_errors=True)


def _leaves_with_paths(tree) -> list[tuple[tuple[str, ...], object]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(str(k.key) for k in path), leaf) for path, leaf in flat]


def layers_per_piece(leaf_shape, itemsize: int, group_bytes: int) -> int:
    """How many layers of a stacked leaf fit in one piece of at most `group_bytes`."""
    per_layer = int(np.prod(leaf_shape[1:], dtype=np.int64)) * itemsize
    return max(1, min(int(leaf_shape[0]), group_bytes // max(per_layer, 1)))


def save_params(
    path: str | os.PathLike,
    cfg: ModelConfig,
    params,
    *,
    overwrite=False,
    group_bytes: int = DEFAULT_GROUP_BYTES,
) -> str:
    """Writes a params-only checkpoint atomically; returns the absolute directory path.

    `params` may hold numpy or (sharded) jax arrays; leaves under `layers` are written as
    layer slabs (see `ParamsWriter`).
    """
    with ParamsWriter(path, cfg, overwrite=overwrite, group_bytes=group_bytes) as writer:
        for leaf_path, leaf in _leaves_with_paths(params):
            itemsize = jnp.dtype(leaf.dtype).itemsize
            if leaf_path[0] == LAYERS_KEY:
                step = layers_per_piece(leaf.shape, itemsize, group_bytes)
                for s in range(0, leaf.shape[0], step):
                    writer.add(leaf_path, leaf[s : s + step], shape=leaf.shape, start=s)
            else:
                writer.add(leaf_path, leaf, shape=leaf.shape)
    return writer.path


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored with a params checkpoint."""
    cfg_path = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise CheckpointNotFoundError(
            f"No {CONFIG_FILE} in {os.fspath(path)}: not a loopcoder-jax params checkpoint "
            "(write one with `python -m loopcoder_jax.convert hf-to-orbax` or train.py)."
        )
    return ModelConfig.from_hf(cfg_path)


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The piece manifest of a params checkpoint, or None for a single-tree (legacy) one."""
    manifest = os.path.join(os.fspath(path), PARAMS_ITEM, MANIFEST_FILE)
    if not os.path.exists(manifest):
        return None
    with open(manifest) as f:
        out = json.load(f)
    if out.get("format") != MANIFEST_FORMAT:
        raise CheckpointNotFoundError(
            f"{manifest} has format {out.get('format')!r}; this version reads {MANIFEST_FORMAT!r}."
        )
    return out


def _check_manifest(path: str, manifest: dict, target) -> None:
    expected = {"/".join(p): tuple(x.shape) for p, x in _leaves_with_paths(target)}
    stored = {k: tuple(v["shape"]) for k, v in manifest["leaves"].items()}
    if expected != stored:
        missing = sorted(set(expected) - set(stored))
        extra = sorted(set(stored) - set(expected))
        bad = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
        raise ValueError(
            f"{path}: params do not match its config.json (missing {missing}, unexpected "
            f"{extra}, shape mismatch {[(k, stored[k], expected[k]) for k in bad]}). The "
            "checkpoint was edited or written by another tool; re-create it."
        )


def _piece_sharding(sharding, stacked: bool):
    """Sharding for one layer slab of a leaf that will end up with `sharding`."""
    if not stacked or isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        # The slab's layer count need not divide the mesh axis that shards layers: replicate
        # the layers axis for the slab; the concatenation below reshards it.
        return jax.sharding.NamedSharding(sharding.mesh, P(None, *spec[1:]))
    return jax.sharding.SingleDeviceSharding(next(iter(sharding.addressable_devices)))


def iter_groups(path: str | os.PathLike, manifest: dict):
    """(group name, [(leaf key, piece entry)]) in write order."""
    groups: dict[str, list] = {}
    for key, entry in manifest["leaves"].items():
        for piece in entry["pieces"]:
            groups.setdefault(piece["group"], []).append((key, piece))
    return sorted(groups.items())


def iter_param_pieces(path: str | os.PathLike, *, dtype=None):
    """Yields (leaf path, start layer or None, numpy piece), one Orbax group at a time.

    Host memory stays at about one group: this is how `orbax-to-hf` streams.
    """
    path = os.path.abspath(os.fspath(path))
    manifest = read_manifest(path)
    if manifest is None:  # single-tree checkpoint: one leaf at a time is all we can do
        _, params = load_params(path, dtype=dtype)
        for leaf_path, leaf in _leaves_with_paths(params):
            yield leaf_path, None, np.asarray(leaf)
        return
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    for group, members in iter_groups(path, manifest):
        args = {p["key"]: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype) for _, p in members}
        restored = checkpointer.restore(
            os.path.join(path, PARAMS_ITEM, group), args=ocp.args.PyTreeRestore(restore_args=args)
        )
        for key, p in members:
            yield tuple(key.split("/")), p["start"], restored.pop(p["key"])


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
      dtype: optional dtype to restore every leaf as (e.g. "bfloat16"). Default: each leaf's
        stored dtype (a bf16 checkpoint stays bf16).
      shardings: optional pytree of `jax.sharding.Sharding` matching the params, to restore
        straight onto a mesh (any mesh: Orbax reads only the slices each device owns).
        Default: the first local device.
    Returns:
      (ModelConfig, params)
    """
    path = os.path.abspath(os.fspath(path))
    cfg = load_config(path)
    item = resolve_params_item(path)
    target = abstract_params(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, target)
    # a training run's params are one Orbax tree per step (no piece manifest)
    manifest = read_manifest(path) if item == os.path.join(path, PARAMS_ITEM) else None
    if manifest is None:
        return cfg, _load_single_tree(item, target, dtype, shardings)
    _check_manifest(path, manifest, target)
    flat_shardings = {"/".join(p): s for p, s in _leaves_with_paths(shardings)}
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    pending: dict[str, dict] = {}
    done: dict[str, jax.Array] = {}
    for group, members in iter_groups(path, manifest):
        args = {}
        for key, p in members:
            entry = manifest["leaves"][key]
            stacked = p["start"] is not None
            shape = list(entry["shape"])
            if stacked:
                shape[0] = p["stop"] - p["start"]
            args[p["key"]] = ocp.ArrayRestoreArgs(
                sharding=_piece_sharding(flat_shardings[key], stacked),
                global_shape=tuple(shape),
                dtype=jnp.dtype(dtype or entry["dtype"]),
            )
        restored = checkpointer.restore(
            os.path.join(item, group), args=ocp.args.PyTreeRestore(restore_args=args)
        )
        for key, p in members:
            pending.setdefault(key, {})[p["start"]] = restored.pop(p["key"])
            entry = manifest["leaves"][key]
            if len(pending[key]) == len(entry["pieces"]):
                pieces = pending.pop(key)
                done[key] = _assemble(
                    [pieces[s] for s in sorted(pieces, key=lambda s: s or 0)],
                    flat_shardings[key],
                )
    params: dict = {}
    for leaf_path, _ in _leaves_with_paths(target):
        node = params
        for k in leaf_path[:-1]:
            node = node.setdefault(k, {})
        node[leaf_path[-1]] = done["/".join(leaf_path)]
    return cfg, params


def _assemble(pieces: list, sharding):
    if len(pieces) == 1 and pieces[0].sharding == sharding:
        return pieces[0]
    concat = jax.jit(lambda *xs: jnp.concatenate(xs, axis=0), out_shardings=sharding)
    return concat(*pieces)


def _load_single_tree(item: str, target, dtype, shardings):
    """Restores the single-Orbax-tree layout written by earlier versions of `save_params`."""
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(item).item_metadata.tree

    def spec(x, meta, s):
        out_dtype = jnp.dtype(dtype) if dtype else jnp.dtype(meta.dtype)
        return jax.ShapeDtypeStruct(x.shape, out_dtype, sharding=s)

    target = jax.tree.map(spec, target, stored, shardings)
    return checkpointer.restore(item, target)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False):
    """Yields a temporary directory that becomes `path` only if the block succeeds.

    On an exception the temporary directory is removed and `path` is left untouched, so a
    directory at `path` is always complete.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True (--overwrite) or pick a new path."
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


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


class _FrozenState:
    """A JSON-able data-iterator state, fixed at save time, shaped for grain's Orbax handler.

    Saves finish asynchronously while training (and the iterator) moves on, so the handler
    must not read the live iterator. grain's handler writes one file per process
    (`process_<i>-of-<n>.json`).
    """

    def __init__(self, state):
        self._bytes = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._bytes


class TrainCheckpointer:
    """Orbax `CheckpointManager` for a training run: RUN/checkpoints/<step>/{params,
    opt_state, data, meta}.

    params and opt_state are sharded Orbax trees (restorable onto any mesh: pass the target
    shardings); data holds each process's data-iterator state (grain's handler, one JSON file
    per process); meta is JSON (step and whatever the caller adds). Saves are asynchronous
    when `async_save`; the last `keep` steps are kept; a step directory appears under its
    final name only once complete. Every process must call `save`/`restore` (collective).
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

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state, *, data_state=None, meta=None) -> None:
        """Starts saving `state` (a TrainState) as `step`; returns before the write finishes.

        data_state: this process's JSON-able data-iterator state (each process passes its own).
        """
        import grain

        items = {
            PARAMS_ITEM: ocp.args.StandardSave(state.params),
            OPT_STATE_ITEM: ocp.args.StandardSave(state.opt_state),
            META_ITEM: ocp.args.JsonSave({"step": int(step), **(meta or {})}),
        }
        if data_state is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(_FrozenState(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state):
        """Restores `step` onto the shardings carried by `abstract_state`'s leaves.

        abstract_state: a TrainState of `jax.ShapeDtypeStruct`s with `.sharding` set (any
        mesh, not necessarily the one the checkpoint was written from).
        Returns (TrainState, meta dict).
        """
        items = {
            PARAMS_ITEM: ocp.args.StandardRestore(abstract_state.params),
            OPT_STATE_ITEM: ocp.args.StandardRestore(abstract_state.opt_state),
            META_ITEM: ocp.args.JsonRestore(),
        }
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        step_arr = jnp.asarray(step, jnp.int32)
        if getattr(abstract_state.step, "sharding", None) is not None:
            step_arr = jax.device_put(step_arr, abstract_state.step.sharding)
        state = abstract_state.replace(
            step=step_arr, params=out[PARAMS_ITEM], opt_state=out[OPT_STATE_ITEM]
        )
        return state, dict(out[META_ITEM])

    def data_states(self, step: int) -> list:
        """The data-iterator states every process saved at `step` (in process order)."""
        directory = os.path.join(self.step_dir(step), DATA_ITEM)
        if not os.path.isdir(directory):
            raise CheckpointNotFoundError(
                f"Checkpoint {self.step_dir(step)} has no data-iterator state, so the data "
                "stream cannot resume exactly. Start a new run dir, or pass --init-from with "
                "this run dir to start from its params."
            )
        files = [n for n in os.listdir(directory) if n.startswith("process_")]
        files.sort(key=lambda n: int(n[len("process_") :].split("-of-")[0]))
        out = []
        for name in files:
            with open(os.path.join(directory, name)) as f:
                out.append(json.load(f))
        return out

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
