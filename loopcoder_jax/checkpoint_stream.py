"""Reads a training run's params tree in layer slabs, so a whole model is never in host memory.

A training run saves each step's params as ONE Orbax tree (`checkpoint.TrainCheckpointer`),
not in the sliced layout of a params checkpoint (`checkpoint.ParamsWriter`), and Orbax's
restore API returns whole leaves: the 40B model's stacked MLP leaves are 22.6 GB each in bf16.
Orbax stores every leaf as a zarr array inside an OCDBT key-value store (`_METADATA` says so:
`use_ocdbt`, `use_zarr3`), and tensorstore (the library Orbax writes with) reads any slice of
such an array; but it decompresses whole zarr chunks, and a single-device save stores each leaf
as ONE chunk. `iter_tree_pieces` therefore reads one leaf (or, for a leaf chunked along the
layers axis, as a sharded save may chunk it, one run of whole chunks) at a time and yields it in
slabs of whole layers of at most `group_bytes`, like `checkpoint.iter_param_pieces`: host memory
is about the largest leaf, never the whole model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np

from loopcoder_jax import checkpoint as ckpt

_METADATA_FILE = "_METADATA"


class UnsupportedLayout(ValueError):
    """The tree is not in the OCDBT + zarr layout this module reads (use the whole-tree load)."""


def tree_leaves(item_dir: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Leaf path -> (shape, dtype) of the Orbax tree at `item_dir`, without reading the data."""
    meta_path = os.path.join(item_dir, _METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise UnsupportedLayout(f"{item_dir} has no {_METADATA_FILE}")
    with open(meta_path) as f:
        meta = json.load(f)
    if not meta.get("use_ocdbt") or meta.get("use_zarr3"):
        raise UnsupportedLayout(f"{item_dir} is not an OCDBT + zarr2 Orbax tree")
    out = {}
    for entry in meta["tree_metadata"].values():
        path = tuple(str(k["key"]) for k in entry["key_metadata"])
        array = _open(item_dir, path)
        out[path] = (tuple(array.shape), np.dtype(array.dtype.numpy_dtype))
    return out


def _open(item_dir: str, path: tuple[str, ...]):
    import tensorstore as ts

    spec = {
        "driver": "zarr",
        "kvstore": {
            "driver": "ocdbt",
            "base": "file://" + os.path.abspath(item_dir) + "/",
            "path": ".".join(path),
        },
    }
    return ts.open(spec, read=True, open=True).result()


def iter_tree_pieces(
    item_dir: str, group_bytes: int = ckpt.DEFAULT_GROUP_BYTES
) -> Iterator[tuple[tuple[str, ...], int | None, np.ndarray]]:
    """Yields (leaf path, start layer or None, numpy piece): leaves under `layers` in slabs of
    whole layers of at most `group_bytes`, the others whole."""
    for path, (shape, dtype) in tree_leaves(item_dir).items():
        array = _open(item_dir, path)
        if path[0] != ckpt.LAYERS_KEY:
            yield path, None, np.asarray(array.read().result())
            continue
        # A zarr chunk is read and decompressed whole, so reading less than a chunk saves
        # nothing: slabs are whole chunks along the layers axis (a single-device save makes the
        # whole leaf one chunk: then the leaf is read once and handed out in slabs).
        per_chunk = int(array.chunk_layout.read_chunk.shape[0] or shape[0])
        step = ckpt.layers_per_piece(shape, dtype.itemsize, group_bytes)
        step = -(-step // per_chunk) * per_chunk
        for start in range(0, shape[0], step):
            block = np.asarray(array[start : start + step].read().result())
            sub = ckpt.layers_per_piece(shape, dtype.itemsize, group_bytes)
            for k in range(0, block.shape[0], sub):
                yield path, start + k, block[k : k + sub]
            del block
