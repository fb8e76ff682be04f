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
import numpy as np
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


# ---------------------------------------------------------------------------- meshes
class MeshError(ValueError):
    """The mesh does not fit the devices, the model or the batch; the message names the numbers."""


def resolve_mesh_shape(axis_sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fills the (at most one) -1 axis so the product equals `num_devices`."""
    sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
    known = 1
    for n in sizes.values():
        if n != -1:
            known *= n
    fill = [a for a, n in sizes.items() if n == -1]
    if fill:
        if num_devices % known:
            raise MeshError(
                f"Cannot fill mesh axis '{fill[0]}': {num_devices} devices are not divisible by "
                f"the product {known} of the other axes {sizes}."
            )
        sizes[fill[0]] = num_devices // known
    total = 1
    for n in sizes.values():
        total *= n
    if total != num_devices:
        raise MeshError(
            f"Mesh {sizes} needs {total} devices but {num_devices} are available; make the "
            "product of the mesh axes equal the device count, or set one axis to -1."
        )
    return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor", "sequence") from a `MeshConfig`.

    devices: defaults to all global devices (every process's). On TPU the device order comes
    from `mesh_utils.create_device_mesh` (topology-aware: the innermost axes, tensor and
    sequence, land on the fastest interconnect).
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg.axis_sizes, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        # No physical topology to respect (CPU, fake devices, odd slices): row-major order.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_from_spec(spec: str, devices=None) -> Mesh | None:
    """A command-line mesh: 'data=2,tensor=4' -> `make_mesh` over all devices (fsdp takes the
    rest unless an axis is -1); '' -> None (one device). Raises MeshError naming the spec."""
    from loopcoder_jax.config import ConfigError, MeshConfig

    if not spec:
        return None
    sizes = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise MeshError(
                f"--mesh {spec!r}: expected comma-separated AXIS=SIZE with AXIS in "
                f"{list(MESH_AXES)}, e.g. data=2,tensor=4."
            )
        sizes[name] = int(value)
    if -1 not in sizes.values():
        sizes.setdefault("fsdp", -1)
    try:
        return make_mesh(MeshConfig(**sizes), devices)
    except (ConfigError, MeshError) as e:
        raise MeshError(f"--mesh {spec!r}: {e}") from None


def get_rules(name: str) -> Rules:
    try:
        return RULES[name]
    except KeyError:
        raise MeshError(f"Unknown rules table {name!r}; choose one of {sorted(RULES)}.") from None


def _axes_product(mesh: Mesh, axes) -> tuple[int, tuple[str, ...]]:
    if axes is None:
        return 1, ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n, axes


def check_divisible(shapes, specs, mesh: Mesh, what: str) -> None:
    """Raises `MeshError` listing every array dim that its mesh axes do not divide.

    shapes: tree of objects with `.shape`; specs: matching tree of mesh PartitionSpecs.
    """
    problems = []
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), spec in zip(flat_shapes, flat_specs, strict=True):
        for dim, (size, axes) in enumerate(zip(leaf.shape, tuple(spec), strict=False)):
            n, names = _axes_product(mesh, axes)
            if size % n:
                problems.append(
                    f"{what}{jax.tree_util.keystr(path)} dim {dim} has size {size}, not divisible "
                    f"by mesh axes {names} = {n} devices"
                )
    if problems:
        shape = dict(mesh.shape)
        raise MeshError(
            f"The mesh {shape} does not divide the {what.strip('.') or 'arrays'}:\n  "
            + "\n  ".join(problems[:12])
            + ("\n  ..." if len(problems) > 12 else "")
            + "\nPick mesh sizes that divide these dims (e.g. a smaller mesh.tensor or mesh.fsdp)."
        )


def batch_spec(rules) -> PartitionSpec:
    """Mesh PartitionSpec of a [B, T] batch array."""
    return nn.logical_to_mesh_axes((BATCH, LENGTH), rules)


def check_batch(mesh: Mesh, rules, global_batch: int, seq_len: int, grad_accum: int = 1) -> None:
    """Raises `MeshError` when the global (micro-)batch or seq_len does not split over the mesh."""
    spec = batch_spec(rules)
    n_b, axes_b = _axes_product(mesh, spec[0])
    n_t, axes_t = _axes_product(mesh, spec[1] if len(spec) > 1 else None)
    micro = global_batch // grad_accum
    if micro % n_b:
        raise MeshError(
            f"Global micro-batch {micro} (batch_size {global_batch} / grad_accum {grad_accum}) "
            f"is not divisible by the {n_b} batch shards of mesh axes {axes_b}; use a "
            f"batch_size that is a multiple of {n_b * grad_accum}."
        )
    if seq_len % n_t:
        raise MeshError(
            f"seq_len {seq_len} is not divisible by the {n_t} sequence shards of mesh axes "
            f"{axes_t}."
        )
