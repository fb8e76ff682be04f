"""Silent-data-corruption check: replicated parameters must be bit-identical on every replica.

A parameter that is replicated over some mesh axes (pure data parallelism, or the tensor
axis of a norm scale) is held as identical copies on several devices. A faulty chip or host
can silently flip bits in its copy; training then diverges on that replica only (the
LoopCoder report, DESIGN.md §4). The check fingerprints every device's shard of every
parameter and compares the fingerprints of shards that hold the same slice of the array.

Fingerprint: the shard's bits viewed as uint32 words, reduced to (wrapping sum, xor, sum of
word * position) on the device that holds it. Three uint32 per shard are all that leave the
device, and any single flipped bit changes the xor. In a multi-process job every process
fingerprints its own devices and `jax.experimental.multihost_utils.process_allgather`
collects them, so every process reports the same disagreement.

Usage (every N steps, from the training loop):

    bad = integrity.check_replicas(state.params)      # [] when all replicas agree
    integrity.assert_replicas_identical(state.params)  # raises ReplicaMismatch naming them
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter, defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


class ReplicaMismatch(RuntimeError):
    """Replicas of a parameter differ; `.mismatches` lists each one."""

    def __init__(self, mismatches: list[Mismatch]):
        self.mismatches = mismatches
        lines = [m.describe() for m in mismatches[:20]]
        more = f"\n  ... and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
        super().__init__(
            "Replicated parameters are not bit-identical across replicas (silent data "
            "corruption or a non-deterministic update):\n  "
            + "\n  ".join(lines)
            + more
            + "\nRestart from the last checkpoint without the named device(s)/host(s)."
        )


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One slice of one parameter whose replicas disagree.

    path: the parameter's tree path (e.g. "['layers']['mlp']['up_proj']['kernel']").
    index: the slice of the global array the replicas hold (tuple of slices).
    bad_devices: devices (id, process) whose copy differs from the majority.
    good_devices: devices holding the majority fingerprint.
    """

    path: str
    index: tuple
    bad_devices: tuple[tuple[int, int], ...]
    good_devices: tuple[tuple[int, int], ...]

    def describe(self) -> str:
        bad = ", ".join(f"device {d} (process {p})" for d, p in self.bad_devices)
        return (
            f"{self.path}{_fmt_index(self.index)}: {bad} disagree(s) with "
            f"{len(self.good_devices)} replica(s)"
        )


def _fmt_index(index) -> str:
    parts = []
    for s in index:
        if isinstance(s, slice) and s.start is None and s.stop is None:
            parts.append(":")
        elif isinstance(s, slice):
            parts.append(f"{s.start or 0}:{s.stop}")
        else:
            parts.append(str(s))
    return "[" + ", ".join(parts) + "]" if parts else ""


@jax.jit
def _fingerprint(x):
    """[any shape, any dtype] -> uint32[3]: (sum, xor, position-weighted sum) of its words."""
    bits = _as_uint32_words(x)
    pos = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    total = jnp.sum(bits, dtype=jnp.uint32)
    xor = jax.lax.reduce(bits, jnp.uint32(0), jax.lax.bitwise_xor, (0,))
    weighted = jnp.sum(bits * pos, dtype=jnp.uint32)
    return jnp.stack([total, xor, weighted])


def _as_uint32_words(x):
    flat = x.reshape(-1)
    size = jnp.dtype(flat.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(flat, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(flat, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return jax.lax.bitcast_convert_type(flat, jnp.uint8).astype(jnp.uint32)
    if size == 8:  # two words per element
        return jax.lax.bitcast_convert_type(flat, jnp.uint32).reshape(-1)
    raise TypeError(f"cannot fingerprint dtype {flat.dtype}")


def _index_key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def _leaves(params):
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.Array):
            yield jax.tree_util.keystr(path), leaf


def _process_slots(leaf, process: int):
    """(device, index) of `process`'s shards of `leaf`, in the sharding's device order: the
    same order on every process, so an all-gathered position identifies the same slot."""
    index_map = leaf.sharding.devices_indices_map(leaf.shape)
    return [(d, idx) for d, idx in index_map.items() if d.process_index == process]


@functools.lru_cache(maxsize=256)
def _per_device_fingerprint_fn(mesh, spec):
    """One program fingerprinting every device's own copy of a NamedSharding'd leaf.

    `shard_map` runs `_fingerprint` on each device's local block with no communication (a
    replicated in_spec is not checked, so each device reads its own, possibly corrupted,
    copy); device i's result lands in row i of a [devices, 3] output. One compile per
    (mesh, spec, shape) instead of one per (device, shape) when jitting each shard.
    """
    axes = tuple(mesh.axis_names)
    fn = jax.shard_map(
        lambda x: _fingerprint(x)[None],
        mesh=mesh,
        in_specs=(spec,),
        out_specs=PartitionSpec(axes),
        check_vma=False,
    )
    return jax.jit(fn)


def _device_fingerprints(leaf) -> dict:
    """{device: uint32[3] device array} for this process's devices holding `leaf`."""
    if isinstance(leaf.sharding, NamedSharding):
        out = _per_device_fingerprint_fn(leaf.sharding.mesh, leaf.sharding.spec)(leaf)
        return {s.device: s.data[0] for s in out.addressable_shards}
    # other shardings (e.g. one device): fingerprint each shard on its own device
    return {s.device: _fingerprint(s.data) for s in leaf.addressable_shards}


def fingerprints(params) -> list[tuple[str, tuple, int, int, np.ndarray]]:
    """(path, index, device id, process index, uint32[3]) for this process's shards."""
    out = []
    me = jax.process_index()
    for name, leaf in _leaves(params):
        by_device = _device_fingerprints(leaf)  # computed on each shard's own device
        for dev, index in _process_slots(leaf, me):
            out.append((name, index, dev.id, me, by_device[dev]))
    return [(n, i, d, p, np.asarray(fp)) for n, i, d, p, fp in out]


def check_replicas(params) -> list[Mismatch]:
    """Compares the fingerprints of every replicated slice of every parameter.

    Args:
      params: a pytree of (sharded) `jax.Array`s, e.g. `state.params`.
    Returns:
      The mismatches (empty when every replica agrees). A slice held by two devices that
      disagree has no majority: both are reported as bad.
    """
    table = fingerprints(params)
    if jax.process_count() > 1:
        table = _gather_multiprocess(params, table)
    groups: dict[tuple[str, tuple], list[tuple[int, int, bytes]]] = defaultdict(list)
    index_of = {}
    for name, index, dev, proc, fp in table:
        key = (name, _index_key(index))
        index_of[key] = index
        groups[key].append((dev, proc, np.asarray(fp, np.uint32).tobytes()))
    mismatches = []
    for key, members in groups.items():
        counts = Counter(fp for _, _, fp in members)
        if len(counts) == 1:
            continue
        top, n_top = counts.most_common(1)[0]
        has_majority = n_top > len(members) / 2
        bad = tuple((d, p) for d, p, fp in members if not has_majority or fp != top)
        good = tuple((d, p) for d, p, fp in members if has_majority and fp == top)
        mismatches.append(Mismatch(key[0], index_of[key], bad, good))
    return mismatches


def _gather_multiprocess(params, local_table):
    """Every process's fingerprints (the same table on every process)."""
    from jax.experimental import multihost_utils

    fps = np.stack([fp for *_, fp in local_table]).astype(np.uint32)
    all_fps = np.asarray(multihost_utils.process_allgather(fps))  # [P, n, 3]
    table = []
    for proc in range(all_fps.shape[0]):
        i = 0
        for name, leaf in _leaves(params):
            for dev, index in _process_slots(leaf, proc):
                table.append((name, index, dev.id, proc, all_fps[proc, i]))
                i += 1
    return table


def assert_replicas_identical(params) -> None:
    """Raises `ReplicaMismatch` naming each parameter slice and device that disagrees."""
    mismatches = check_replicas(params)
    if mismatches:
        raise ReplicaMismatch(mismatches)
