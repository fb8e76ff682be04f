"""Every checkpoint write and read goes through here (Orbax).

Params-only checkpoint (what the converter writes, and what `train.py --init-from` and
`infer.py --checkpoint` read), a directory:
    DIR/config.json     the HF-shaped ModelConfig (`ModelConfig.to_hf()`)
    DIR/params/         the Flax `params`: Orbax checkpoints of layer slabs + manifest.json
                        (see `ParamsWriter`: written one slab at a time, so converting a
                        model never needs it whole in host memory)
A local directory is assembled under a temporary name and renamed into place at the end, so a
crash never leaves a `DIR` that looks complete. On an object store (`gs://`) there is no atomic
rename: the directory is written in place and is complete once its commit file
(`commit_success.txt`, Orbax's rule) is written, last; readers refuse one without it. Training
runs use Orbax's CheckpointManager, which applies the same rule to its step directories.
See `storage.py`.
"""

from __future__ import annotations

import contextlib
import errno
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

from loopcoder_jax import checkpoint_integrity as integrity
from loopcoder_jax import quiet_logs, storage
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
    """Writes JSON so readers never see a half-written file (local: temp file + rename;
    object store: one object write)."""
    storage.write_json(path, obj)


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
    Locally, everything is written under a temporary directory renamed to DIR by `commit()`;
    an exception inside the `with` block removes it, so a DIR that exists is complete. On an
    object store DIR is written in place and `commit()` writes DIR/commit_success.txt last
    (readers refuse a DIR without it); an exception removes what was written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        cfg: ModelConfig,
        *,
        overwrite: bool = False,
        group_bytes: int = DEFAULT_GROUP_BYTES,
    ):
        self.path = storage.resolve(path)
        if storage.exists(self.path) and not overwrite:
            raise FileExistsError(
                f"{self.path} already exists; pass overwrite=True (--overwrite) or pick a new path."
            )
        self.cfg = cfg
        self.group_bytes = group_bytes
        parent = storage.parent(self.path)
        # Multi-process (jax.distributed): every process writes its own shards into the SAME
        # directory, so the name cannot be random; the primary process owns the directory.
        self._primary = jax.process_index() == 0
        self._multi = jax.process_count() > 1
        self._remote = storage.is_remote(self.path)
        suffix = "mp" if self._multi else uuid.uuid4().hex[:8]
        if self._remote:  # no rename on object stores: in place, committed by a commit file
            self.tmp = self.path
        else:
            self.tmp = os.path.join(parent, f".{os.path.basename(self.path)}.tmp-{suffix}")
        if self._primary:
            storage.makedirs(parent)
            # a crashed earlier multi-process run; on an object store also the DIR replaced
            # by --overwrite (its commit file goes first)
            storage.rmtree(self.tmp)
            storage.makedirs(storage.join(self.tmp, PARAMS_ITEM))
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
        committed = False
        try:
            if exc_type is None:
                self.commit()  # may fail too (disk full while writing the last group)
                committed = True
        finally:
            # On an object store tmp IS the destination: never remove it once committed.
            if self._primary and not committed:
                storage.rmtree(self.tmp)

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
        item = storage.join(self.tmp, PARAMS_ITEM, self._group_name())
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
            write_json_atomic(storage.join(self.tmp, PARAMS_ITEM, MANIFEST_FILE), manifest)
            write_json_atomic(storage.join(self.tmp, CONFIG_FILE), self.cfg.to_hf())
            if self._remote:
                storage.mark_committed(self.path)
                return
            if os.path.exists(self.path):
                shutil.rmtree(self.path)
            os.replace(self.tmp, self.path)
        except BaseException:
            if self._remote:
                storage.rmtree(self.tmp)
            raise
        finally:
            if not self._remote and os.path.exists(self.tmp):
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


def _require_committed(path: str) -> None:
    """On an object store a params checkpoint is complete only once its commit file exists."""
    if (
        storage.is_remote(path)
        and storage.isdir(storage.join(path, PARAMS_ITEM))
        and not storage.is_committed(path)
    ):
        raise CheckpointNotFoundError(
            f"{path} is an incomplete params checkpoint (no {storage.COMMIT_FILE}: its writer "
            "stopped before the end). Write it again, with --overwrite."
        )


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored with a params checkpoint."""
    path = storage.resolve(path)
    _require_committed(path)
    cfg_path = storage.join(path, CONFIG_FILE)
    if not storage.exists(cfg_path):
        raise CheckpointNotFoundError(
            f"No {CONFIG_FILE} in {path}: not a loopcoder-jax params checkpoint "
            "(write one with `python -m loopcoder_jax.convert hf-to-orbax` or train.py)."
        )
    if storage.is_remote(cfg_path):
        return ModelConfig.from_hf(storage.read_json(cfg_path))
    return ModelConfig.from_hf(cfg_path)


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The piece manifest of a params checkpoint, or None for a single-tree (legacy) one."""
    manifest = storage.join(path, PARAMS_ITEM, MANIFEST_FILE)
    if not storage.exists(manifest):
        return None
    out = storage.read_json(manifest)
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
    path = storage.resolve(path)
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
            storage.join(path, PARAMS_ITEM, group), args=ocp.args.PyTreeRestore(restore_args=args)
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
    path = storage.resolve(path)
    cfg = load_config(path)
    item = resolve_params_item(path)
    target = abstract_params(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, target)
    # a training run's params are one Orbax tree per step (no piece manifest)
    manifest = read_manifest(path) if item == storage.join(path, PARAMS_ITEM) else None
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
            storage.join(item, group), args=ocp.args.PyTreeRestore(restore_args=args)
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
    directory at `path` is always complete. Local paths only (it commits by rename).
    """
    if storage.is_remote(path):
        raise storage.RemoteStorageError(
            f"{os.fspath(path)}: this output is written as a local directory; write it to a "
            "local path, then copy it (e.g. gcloud storage cp -r)."
        )
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
INTEGRITY_ITEM = "integrity"


class NonFiniteStateError(ValueError):
    """The state to be saved holds NaN/inf: it is not saved (`leaves` names them)."""

    def __init__(self, step: int, leaves: list[str]):
        self.step, self.leaves = step, leaves
        super().__init__(
            f"step {step}: not saving a checkpoint with non-finite values (NaN/inf) in "
            f"{integrity.short_list(leaves)}"
        )


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, permissions, I/O); nothing half-written remains
    under a step's final name."""

    def __init__(self, where: str, cause: BaseException):
        self.cause = cause
        disk_full = isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        disk_full = disk_full or "No space left" in str(cause)
        fix = (
            "the disk is full (No space left on device): free space or point train.run_dir at "
            "a larger disk"
            if disk_full
            else "fix the storage problem"
        )
        super().__init__(
            f"Saving a checkpoint in {where} failed; nothing was committed under that name. "
            f"Hint: {fix}, then rerun the same command to resume from the last committed "
            f"checkpoint. Cause: {_first_line(cause)}"
        )


class CheckpointCorruptError(RuntimeError):
    """Every checkpoint of a run failed verification; `damaged` lists (step, reason)."""

    def __init__(self, directory: str, damaged: list[tuple[int, str]]):
        self.damaged = damaged
        lines = "\n".join(f"  step {s}: {why}" for s, why in damaged)
        super().__init__(
            f"No checkpoint in {directory} verifies, so the run cannot resume:\n{lines}\n"
            "Restore the run dir from a backup, or start over with a new --run-dir "
            "(optionally --init-from a params checkpoint you trust)."
        )


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    # TensorStore appends a multi-line spec dump to its messages: keep the reason only.
    text = text[0].split(" See full TensorStore details")[0] if text else ""
    return f"{type(e).__name__}: {text[:limit]}"


def _agree(problem: str | None) -> str | None:
    """Every process's verdict on a step combined (any problem anywhere is a problem)."""
    if jax.process_count() == 1:
        return problem
    bad = multihost_utils.process_allgather(np.int32(problem is not None))
    if problem is None and np.any(bad):
        return f"unreadable on process(es) {np.flatnonzero(bad).tolist()}"
    return problem


def finished_steps(run_dir: str | os.PathLike) -> list[int]:
    """Committed checkpoint steps of a run, ascending.

    Orbax's commit rules: locally it writes each step under a temporary name and renames it to
    `<step>` once every item is written, so an integer-named directory is complete; on an
    object store it writes `<step>` in place and its commit file last.
    """
    ckpt_dir = storage.join(storage.resolve(run_dir), CHECKPOINTS_DIR)
    if not storage.isdir(ckpt_dir):
        return []
    steps = [n for n in storage.listdir(ckpt_dir) if n.isdigit()]
    if storage.is_remote(ckpt_dir):
        steps = [n for n in steps if storage.is_committed(storage.join(ckpt_dir, n))]
    return sorted(int(n) for n in steps)


def resolve_params_item(path: str) -> str:
    """The Orbax params directory of a params checkpoint or of a run dir's latest step."""
    direct = storage.join(path, PARAMS_ITEM)
    if storage.isdir(direct):
        return direct
    steps = finished_steps(path)
    if steps:
        return storage.join(path, CHECKPOINTS_DIR, str(steps[-1]), PARAMS_ITEM)
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
        self.directory = storage.join(storage.resolve(run_dir), CHECKPOINTS_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a killed save are not checkpoints
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step of the save running in the background

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def save(self, step: int, state, *, data_state=None, meta=None) -> None:
        """Starts saving `state` (a TrainState) as `step`; returns before the write finishes.

        data_state: this process's JSON-able data-iterator state (each process passes its own).
        """
        import grain

        # Checksums (and the finite check) of exactly the arrays being saved, computed before
        # the next step can donate them; see checkpoint_integrity.py.
        manifest = integrity.digest({PARAMS_ITEM: state.params, OPT_STATE_ITEM: state.opt_state})
        if manifest["nonfinite"]:
            raise NonFiniteStateError(step, manifest["nonfinite"])
        items = {
            PARAMS_ITEM: ocp.args.StandardSave(state.params),
            OPT_STATE_ITEM: ocp.args.StandardSave(state.opt_state),
            META_ITEM: ocp.args.JsonSave({"step": int(step), **(meta or {})}),
            INTEGRITY_ITEM: ocp.args.JsonSave(manifest),
        }
        if data_state is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(_FrozenState(data_state))
        self.check_for_errors()  # an earlier background save that failed: say so, now
        try:
            self.wait()  # Orbax would wait here anyway; this names the step that failed
            self._pending = step
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except CheckpointSaveError:
            raise
        except Exception as e:  # noqa: BLE001  (a failed write of any kind: disk full, I/O)
            raise self._failed(e) from e

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
        """The data-iterator states every process saved at `step` (in process order).

        Raises CheckpointNotFoundError when the step has none, ValueError for a garbled file.
        """
        directory = storage.join(self.step_dir(step), DATA_ITEM)
        if not storage.isdir(directory):
            raise CheckpointNotFoundError(
                f"Checkpoint {self.step_dir(step)} has no data-iterator state, so the data "
                "stream cannot resume exactly. Start a new run dir, or pass --init-from with "
                "this run dir to start from its params."
            )
        files = [n for n in storage.listdir(directory) if n.startswith("process_")]
        files.sort(key=lambda n: int(n[len("process_") :].split("-of-")[0]))
        return [storage.read_json(storage.join(directory, name)) for name in files]

    def check_for_errors(self) -> None:
        """Raises `CheckpointSaveError` if a background save has failed (cheap; call per step)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._failed(e) from e

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(e) from e
        self._pending = None

    def _failed(self, cause: BaseException) -> CheckpointSaveError:
        """The error for a failed save; removes its partial files (they only take space: a
        step directory gets its final name only when complete)."""
        step, self._pending = self._pending, None
        if jax.process_index() == 0 and storage.isdir(self.directory):
            for name in storage.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:
                    storage.rmtree(storage.join(self.directory, name))
        where = self.step_dir(step) if step is not None else self.directory
        return CheckpointSaveError(where, cause)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    # ------------------------------------------------------------------ verified restore
    def saved_manifest(self, step: int) -> dict | None:
        """The checksum manifest saved with `step`, or None for a step written before them."""
        if not storage.isdir(storage.join(self.step_dir(step), INTEGRITY_ITEM)):
            return None
        out = self.manager.restore(
            step, args=ocp.args.Composite(**{INTEGRITY_ITEM: ocp.args.JsonRestore()})
        )
        return dict(out[INTEGRITY_ITEM])

    def verify_restored(self, step: int, state) -> str | None:
        """Why the restored `state` of `step` cannot be trusted, or None (collective)."""
        restored = integrity.digest({PARAMS_ITEM: state.params, OPT_STATE_ITEM: state.opt_state})
        return integrity.compare(self.saved_manifest(step), restored)

    def restore_verified(self, abstract_state, log=print):
        """Restores the newest step that verifies, walking back past damaged ones.

        Each step is restored and its arrays checked against the checksums saved with it
        (steps written before checksums existed: finiteness only, with a note). A step that
        fails is logged with the reason and the next older one is tried.
        Returns (step, TrainState, meta, data states of every process), or None when the run
        has no checkpoints. Raises `CheckpointCorruptError` (naming every step and its
        damage) when checkpoints exist but none verifies: never a silent fresh start.
        """
        steps = finished_steps(storage.parent(self.directory))
        damaged: list[tuple[int, str]] = []
        for step in reversed(steps):
            state = meta = data = None
            try:
                state, meta = self.restore(step, abstract_state)
                data = self.data_states(step)
                problem = None
            except Exception as e:  # noqa: BLE001  (truncated/garbled files: reader errors)
                problem = f"unreadable: {_first_line(e)}"
            problem = _agree(problem)  # all processes take the same decision
            if problem is None:
                problem = self.verify_restored(step, state)
            if problem is None:
                if self.saved_manifest(step) is None:
                    log(
                        f"[train] note: checkpoint {step} predates checksums (older version); "
                        "restored unverified (finite values checked)"
                    )
                self._set_aside(damaged, log)
                return step, state, meta, data
            damaged.append((step, problem))
            log(f"[train] skipped checkpoint {self.step_dir(step)}: {problem}")
        if damaged:
            raise CheckpointCorruptError(self.directory, damaged)
        return None

    def _set_aside(self, damaged: list[tuple[int, str]], log) -> None:
        """Renames damaged steps newer than the resumed one to `<step>.damaged` (kept for a
        post-mortem; no longer a step name), so training can write those steps again."""
        if not damaged:
            return
        if jax.process_index() == 0:
            for step, _ in damaged:
                if storage.is_remote(self.directory):  # object stores cannot rename
                    storage.rmtree(self.step_dir(step))
                    log(f"[train] deleted the damaged checkpoint {self.step_dir(step)}")
                    continue
                aside = f"{self.step_dir(step)}.damaged-{uuid.uuid4().hex[:6]}"
                os.rename(self.step_dir(step), aside)
                log(f"[train] moved the damaged checkpoint to {aside}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"loopcoder_jax.set_aside:{self.directory}")
        self.manager.reload()
