"""Checksums of a training checkpoint's arrays, and the check that a restored step matches them.

Each saved step carries an `integrity` item (Orbax JSON, written in the same composite save
as params and opt_state, so Orbax commits it with them: a step directory under its final name
never holds a manifest that claims arrays it has not written). The manifest records, per
array leaf, its dtype, shape and a checksum of its bits, plus whether every float was finite.

The checksum is computed on the devices that hold the array, over the GLOBAL array: the bits
as uint32 words w, reduced to three wrapping uint32 sums: of w, of a mix of w's bits, and of
w * hash(global position). Wrapping integer sums do not depend on the order of reduction, so
the same checksum comes out on any mesh: a checkpoint saved from (fsdp=4, tensor=2) verifies
when restored onto one device. A flipped bit k changes the first sum by 2**k (never 0 mod
2**32); a moved word changes the weighted sum. It is an integrity check against
disk/network/storage corruption, not a cryptographic hash.

Restoring the arrays and recomputing their checksums checks exactly what training will use;
a truncated or garbled file that the reader rejects is reported as unreadable.

Steps written before this module existed have no manifest: they are "unverified". Resume
accepts one (with a note) only if it restores and every float in it is finite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

FORMAT = "loopcoder-jax/state-checksums/v1"
_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative hash constant


def _words(x):
    """The bits of `x` as uint32, same shape (sub-word dtypes are zero-extended)."""
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _position_hash(shape):
    """hash(flat global index) as uint32, built from per-axis iotas.

    A flat `arange` would overflow uint32 on a 40B model's largest leaf (> 2**32 elements);
    wrapping multiply-adds of per-axis iotas give the same flat index mod 2**32 and shard
    like the array itself.
    """
    flat = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        flat = flat + iota * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return flat * _GOLDEN + jnp.uint32(1)


def _leaf_digest(x):
    words = _words(x)
    total = jnp.sum(words, dtype=jnp.uint32)
    # Only sums: an xor all-reduce across devices is not implemented on every backend (CPU).
    mixed = jnp.sum((words ^ (words >> 16)) * _GOLDEN, dtype=jnp.uint32)
    weighted = jnp.sum(words * _position_hash(x.shape), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return jnp.stack([total, mixed, weighted]), jnp.asarray(finite)


def _digest_tree(tree):
    leaves, treedef = jax.tree.flatten(tree)
    pairs = [_leaf_digest(x) for x in leaves]
    return (
        jax.tree.unflatten(treedef, [p[0] for p in pairs]),
        jax.tree.unflatten(treedef, [p[1] for p in pairs]),
    )


@functools.lru_cache(maxsize=8)
def _digest_fn(mesh):
    if mesh is None:
        return jax.jit(_digest_tree)
    # Replicated results: every process can read them (multi-process device_get needs that).
    return jax.jit(_digest_tree, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _mesh_of(tree):
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def _named(tree) -> dict[str, object]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def digest(items: dict[str, object]) -> dict:
    """Checksums and finiteness of every array leaf of `items` (e.g. {"params": ..., ...}).

    Collective in a multi-process job (every process must call it): the reductions run on
    the devices holding each array and their results are replicated. Returns the manifest
    dict that `TrainCheckpointer` saves; `manifest["nonfinite"]` lists leaves with NaN/inf.
    """
    sums, finite = (_named(t) for t in jax.device_get(_digest_fn(_mesh_of(items))(items)))
    leaves, nonfinite = {}, []
    for name, x in _named(items).items():
        leaves[name] = {
            "dtype": jnp.dtype(x.dtype).name,
            "shape": list(x.shape),
            "checksum": [int(v) for v in np.asarray(sums[name])],
        }
        if not bool(finite[name]):
            nonfinite.append(name)
    return {"format": FORMAT, "leaves": leaves, "nonfinite": nonfinite}


def compare(saved: dict | None, restored: dict) -> str | None:
    """Why `restored` (a `digest` of the restored arrays) does not match `saved`; None if ok.

    `saved` None means the step predates checksums: only finiteness is checked.
    """
    if restored["nonfinite"]:
        return f"non-finite values (NaN/inf) in {short_list(restored['nonfinite'])}"
    if saved is None:
        return None
    if saved.get("format") != FORMAT:
        return f"checksum manifest has format {saved.get('format')!r}, expected {FORMAT!r}"
    want, got = saved["leaves"], restored["leaves"]
    if set(want) != set(got):
        return f"holds leaves {short_list(sorted(set(want) ^ set(got)))} that the model does not"
    bad = [
        k
        for k in want
        if want[k]["dtype"] == got[k]["dtype"] and want[k]["checksum"] != got[k]["checksum"]
    ]
    if bad:
        return f"checksum mismatch in {short_list(bad)} (the files were changed after saving)"
    return None


def short_list(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
