"""Logical axis names and the rules that map them onto mesh axes.

The model names every parameter and activation axis *logically* (`embed`, `heads`, ...);
one rules table per strategy maps those names onto the mesh axes `data`, `fsdp`, `tensor`
and `sequence`. Mesh axis names appear only in this file.

Weights and activations use different names for the same dimension because they shard
differently: under FSDP a weight's `embed` dim is split over `fsdp`, while an activation's
batch dim is split over (`data`, `fsdp`) and its embed dim stays whole (one mesh axis may
appear only once per PartitionSpec).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# ---- weight axes
LAYERS = "layers"  # leading axis of the stacked per-layer parameters
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
# ---- activation axes
BATCH = "batch"
LENGTH = "length"  # query / sequence positions
KV_LENGTH = "kv_length"  # cache positions (decode)
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
CACHE_LOOPS = "cache_loops"  # the (loop_num - 1) local ring buffers

ALL_LOGICAL_AXES = (
    LAYERS,
    VOCAB,
    EMBED,
    HEADS,
    KV_HEADS,
    HEAD_DIM,
    MLP,
    BATCH,
    LENGTH,
    KV_LENGTH,
    ACT_EMBED,
    ACT_HEADS,
    ACT_KV_HEADS,
    ACT_MLP,
    ACT_VOCAB,
    CACHE_LOOPS,
)

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# FSDP over `fsdp`, Megatron-style tensor parallelism over `tensor`, pure data parallelism
# over `data`, context parallelism over `sequence`.
FSDP_TP: Rules = (
    (LAYERS, None),
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (BATCH, ("data", "fsdp")),
    (LENGTH, "sequence"),
    (KV_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
    (CACHE_LOOPS, None),
)

RULES: dict[str, Rules] = {"fsdp_tp": FSDP_TP}


def logical_to_mesh_sharding(
    logical_tree, mesh: Mesh, rules: Sequence[tuple[str, str | tuple[str, ...] | None]]
):
    """Maps a tree of logical PartitionSpecs to `NamedSharding`s on `mesh`."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)),
        logical_tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def param_shardings(abstract_boxed_params, mesh: Mesh, rules):
    """`NamedSharding` per parameter from the boxed (logically annotated) abstract params."""
    logical = nn.get_partition_spec(abstract_boxed_params)
    return logical_to_mesh_sharding(logical, mesh, rules)
