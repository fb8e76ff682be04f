"""Pallas splash attention (TPU), with the same API as `kernels.reference.attention`.

Splash attention skips the blocks a mask rules out, so the loop >= 1 local branch costs
O(T * W) and the causal branches about half of dense attention (DESIGN.md §3). It is a Pallas
TPU kernel over ONE example and a slice of heads, so it runs inside `jax.shard_map`: batch is
split over whatever mesh axes the rules give `batch` (data, fsdp) and heads over the axes of
`act_heads` (tensor); the sequence stays whole inside each shard, unless the mesh shards it
(`mesh.sequence > 1`): then `kernels/context_parallel.py` runs the kernel on each chip's chunk
of queries against the gathered keys (causal) or a halo band (local).

Where the mesh comes from: the mesh set with `jax.set_mesh(mesh)` (preferred), else the legacy
`with mesh:` context; the logical rules from `flax.linen.logical_axis_rules`. With no mesh (one
device) the kernel runs without `shard_map`.

GQA: the kernel's MHA mode accepts K < N kv heads and serves query head n from kv head
n // G, exactly the grouping of `reference._group`, so kv heads are never repeated.

`interpret=True` runs the kernel through the Pallas interpreter (any backend, slow): it is how
the CPU tests check this file against the reference.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)
from jax.sharding import PartitionSpec

from loopcoder_jax import sharding as sh
from loopcoder_jax.config import AttnImpl
from loopcoder_jax.kernels.reference import Causal, LocalWindow, MaskSpec

# The kernel tiles the key axis in multiples of 128 lanes.
_LANES = 128
# Query block: big blocks keep the MXU busy; 512 is what public TPU recipes use for 4k-32k.
_MAX_BLOCK = 512


class SplashUnsupported(ValueError):
    """The shapes or mesh cannot use the splash kernel; the message says why."""


def unsupported_reason(q_shape, k_shape, mesh=None, rules=None) -> str | None:
    """Why `attention` cannot run these shapes on splash (None when it can).

    Args:
      q_shape: (B, T, N, H); k_shape: (B, S, K, H).
      mesh, rules: the mesh and logical rules in force (default: the current context).
    """
    b, t, n, _ = q_shape
    s, kh = k_shape[1], k_shape[2]
    if t != s:
        return f"splash here is self-attention only (T={t}, S={s})"
    if t % _LANES:
        return f"sequence length {t} is not a multiple of {_LANES}"
    mesh = _current_mesh() if mesh is None else mesh
    if mesh is not None:
        rules = _current_rules() if rules is None else rules
        seq = _axis_size(mesh, _mesh_axes(sh.LENGTH, rules))
        if seq > 1 and (t % seq or (t // seq) % _LANES):
            return (
                f"the {seq}-way sharded sequence (context parallelism) leaves chunks of "
                f"{t / seq:g} positions, not a multiple of {_LANES}"
            )
        batch = _axis_size(mesh, _mesh_axes(sh.BATCH, rules))
        if b % batch:
            return f"batch {b} does not split over the {batch}-way batch sharding"
        heads = _axis_size(mesh, _mesh_axes(sh.ACT_HEADS, rules))
        kv_heads = _axis_size(mesh, _mesh_axes(sh.ACT_KV_HEADS, rules))
        if n % heads or kh % kv_heads or heads != kv_heads:
            return (
                f"{n} query / {kh} kv heads cannot be split evenly over the {heads}-way "
                "head sharding with whole GQA groups per shard"
            )
    return None


def attention(
    q,
    k,
    v,
    mask: MaskSpec,
    segment_ids=None,
    *,
    interpret: bool | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
):
    """Self-attention through the splash kernel (training and prefill).

    Args:
      q: [B, T, N, H] post-RoPE queries.
      k, v: [B, T, K, H] (N % K == 0).
      mask: `Causal()` or `LocalWindow(W)` (key j visible to query i iff i - W < j <= i).
      segment_ids: optional [B, T] int; attention never crosses a segment boundary.
      interpret: run the Pallas interpreter instead of compiling for TPU; None = only when
        the mesh in force (or the default backend) is not a TPU, so CPU tests can run it.
      block_q, block_kv: kernel tile sizes (default: chosen from T and the mask).
    Returns:
      [B, T, N, H] in q's dtype.
    Raises:
      SplashUnsupported: when `unsupported_reason` is not None.
    """
    mesh, rules = _current_mesh(), _current_rules()
    reason = unsupported_reason(q.shape, k.shape, mesh, rules)
    if reason:
        raise SplashUnsupported(f"splash attention cannot run: {reason}. Use attn_impl=xla.")
    if interpret is None:
        interpret = mesh_platform() != "tpu"
    if mesh is not None and _axis_size(mesh, _mesh_axes(sh.LENGTH, rules)) > 1:
        from loopcoder_jax.kernels import context_parallel  # the sequence is sharded

        return context_parallel.attention(
            q, k, v, mask, segment_ids, AttnImpl.SPLASH, interpret=interpret
        )
    t = q.shape[1]
    block_q = block_q or _block(t, _MAX_BLOCK)
    # The local band is only W keys wide: a small kv tile skips more of the masked square.
    default_kv = _LANES if isinstance(mask, LocalWindow) else _MAX_BLOCK
    block_kv = block_kv or _block(t, default_kv)
    # Splash applies no softmax scale; fold head_dim ** -0.5 into q (the reference scales
    # float32 scores instead, so bf16 runs differ by one rounding of q).
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

    def local_attention(q, k, v, segment_ids):
        kernel = _make_kernel(mask, t, q.shape[2], block_q, block_kv, interpret)
        # [B, T, N, H] -> [B, N, T, H]: the kernel wants heads leading, per example.
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        if segment_ids is None:
            out = jax.vmap(kernel)(qt, kt, vt)
        else:
            seg = segment_ids.astype(jnp.int32)
            out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, splash_kernel.SegmentIds(s, s)))(
                qt, kt, vt, seg
            )
        return out.transpose(0, 2, 1, 3).astype(q.dtype)

    if mesh is None:
        return local_attention(q, k, v, segment_ids)
    batch = _mesh_axes(sh.BATCH, rules, mesh)
    heads = _mesh_axes(sh.ACT_HEADS, rules, mesh)
    kv_heads = _mesh_axes(sh.ACT_KV_HEADS, rules, mesh)
    q_spec = PartitionSpec(batch, None, heads, None)
    kv_spec = PartitionSpec(batch, None, kv_heads, None)
    seg_spec = PartitionSpec(batch, None)
    if segment_ids is None:
        fn = jax.shard_map(
            lambda q, k, v: local_attention(q, k, v, None),
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec),
            out_specs=q_spec,
            check_vma=False,
        )
        return fn(q, k, v)
    fn = jax.shard_map(
        local_attention,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )
    return fn(q, k, v, segment_ids)


# ---------------------------------------------------------------------------- helpers
def _block(t: int, largest: int) -> int:
    """The largest tile in {largest, largest/2, ..., 128} that divides T."""
    b = min(largest, t)
    while t % b:
        b //= 2
    return max(b, _LANES) if t % _LANES == 0 else b


def _splash_mask(mask: MaskSpec, t: int):
    if isinstance(mask, Causal):
        return splash_mask.CausalMask((t, t))
    if isinstance(mask, LocalWindow):
        # LocalMask: key j visible iff i - left <= j <= i + right; ours is i - W < j <= i.
        return splash_mask.LocalMask((t, t), (mask.window - 1, 0), offset=0)
    raise TypeError(f"Unknown mask spec {mask!r}")


def _make_kernel(mask: MaskSpec, t: int, num_heads: int, block_q, block_kv, interpret):
    """Builds the kernel for one trace. Not cached across traces: it holds arrays created
    in the trace it was built in (its block-sparsity tables are numpy work, done per trace)."""
    return _make_kernel_for(_splash_mask(mask, t), num_heads, block_q, block_kv, interpret)


def _make_kernel_for(per_head, num_heads: int, block_q, block_kv, interpret, q_seq_shards=1):
    """The kernel for one splash mask shared by all heads. `q_seq_shards` > 1: its
    block-sparsity tables cover the whole query axis and are sharded with the queries
    (`context_parallel`: each sequence shard gets its own rows of the mask)."""
    from loopcoder_jax.kernels import cost_standin

    if cost_standin.kernel_charge():  # a planner counting compile: cost, do not run, splash
        from loopcoder_jax.kernels import splash_cost

        return splash_cost.SplashCost.for_mask(per_head, block_q, block_kv, q_seq_shards)
    sizes = splash_kernel.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    return splash_kernel.make_splash_mha(
        splash_mask.MultiHeadMask([per_head] * num_heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=q_seq_shards,
        interpret=interpret,
    )


def _context_mesh():
    """The mesh in force: `jax.set_mesh`'s, else the legacy `with mesh:` one, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and mesh.shape:
        return mesh
    # Legacy `with mesh:` sets only the thread-resources mesh, with no public getter.
    from jax._src import mesh as mesh_lib

    physical = mesh_lib.thread_resources.env.physical_mesh
    return None if physical.empty else physical


def _current_mesh():
    """The mesh in force, or None when there is none or it has one device."""
    mesh = _context_mesh()
    if mesh is None or int(np.prod(list(mesh.shape.values()))) == 1:
        return None
    return mesh


def _current_rules():
    return tuple(nn.get_logical_axis_rules())


def _mesh_axes(logical: str, rules, mesh=None):
    """Mesh axes a logical name maps to under `rules` (None, a name, or a tuple), keeping
    only axes the mesh has."""
    axes = nn.logical_to_mesh_axes((logical,), rules)[0]
    if axes is None or mesh is None:
        return axes
    names = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.shape)
    return names or None


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape.get(a, 1) for a in names]))


def mesh_platform() -> str:
    """Platform of the mesh in force ('tpu' also for an AOT topology mesh built on a CPU
    host); the default backend when no mesh is set."""
    mesh = _context_mesh()
    if mesh is not None:
        device = getattr(mesh, "abstract_device", None)
        if device is not None and device.platform:
            return device.platform
        devices = getattr(mesh, "devices", None)
        if devices is not None:
            return np.asarray(devices).flat[0].platform
    return jax.default_backend()
