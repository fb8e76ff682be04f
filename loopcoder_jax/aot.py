"""Ahead-of-time fit planner: compile the real step for a TPU topology on a CPU-only machine.

    python -m loopcoder_jax.aot --preset loop40b --topology v5p-128 --mesh fsdp=64 \
        --seq 8192 --global-batch 64 --mode train

With `libtpu` installed (the `tpu` extra) JAX can describe a TPU slice that is not attached
(`jax.experimental.topologies.get_topology_desc`) and compile for it. The planner builds the
same jitted program `train.py` runs (`training.make_train_step`, or the model's `prefill` /
`decode_step` for inference) from abstract inputs (`jax.eval_shape`'d state, ShapeDtypeStruct
batches: nothing is allocated), compiles it, and reports what the TPU compiler says:

  * per-chip HBM: arguments, outputs, temporaries, the total against the chip's capacity;
  * compiled FLOPs per step against the analytic model FLOPs (`flops.py`): the ratio shows
    rematerialisation and what the kernels execute beyond the causal half;
  * the compiler's `optimal_seconds` estimate and the MFU bound it implies. Both are the
    compiler's ESTIMATES, not measurements;
  * the collectives in the compiled HLO by kind, with their bytes.

Counting (DESIGN.md §3): `cost_analysis()` counts the body of a `while`/`scan` once. The
layer stack is a scan, so FLOPs and `optimal_seconds` come from two extra compiles of the
same step with the layers UNROLLED at depth 1 and 2 (and the loss in one chunk, no gradient
accumulation): per-layer cost = c(2) - c(1), total = c(1) + (L - 1) * per-layer, exact
because every layer is the same program. Memory and collectives come from the real
(scanned) program. Splash attention carries no cost of its own; the counting compiles charge
it as `--attention-cost` says (`ATTENTION_COSTS`: its block-sparse work by default,
`kernels/splash_cost.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from loopcoder_jax import flops as flops_lib
from loopcoder_jax import sharding as sh
from loopcoder_jax.config import (
    AttnImpl,
    ConfigError,
    ExperimentConfig,
    MeshConfig,
    Remat,
)

GiB = 1024**3


class PlannerError(RuntimeError):
    """The plan cannot be made (no libtpu, unknown topology, bad mesh); says how to fix it."""


# ---------------------------------------------------------------------------- topologies
@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """What the planner needs to know about one TPU generation.

    cores_in_name: TensorCores per chip counted by the slice name (v4-8 and v5p-8 have 4
      chips: the name counts cores; v5e-8 and v6e-8 have 8 chips).
    hbm_bytes: HBM per chip. peak_flops: dense bf16 FLOP/s per chip (datasheets).
    """

    prefix: str  # libtpu's topology-name prefix
    chip_config: str  # "megacore": the two TensorCores of a chip act as one JAX device
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    cores_in_name: int
    hbm_bytes: int
    peak_flops: float


GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", "megacore", 3, 2, 32 * GiB, 275e12),
    "v5p": TpuGeneration("v5", "megacore", 3, 2, 95 * GiB, 459e12),
    "v5e": TpuGeneration("v5e", "default", 2, 1, 16 * GiB, 197e12),
    "v6e": TpuGeneration("v6e", "default", 2, 1, 32 * GiB, 918e12),
}
GENERATIONS["v5litepod"] = GENERATIONS["v5e"]  # the gcloud accelerator-type spelling

# Chip grids of the standard slice shapes (Cloud TPU docs): chips -> physical dims.
_GRID_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
_GRID_2D = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named TPU slice: `v5p-128` = generation v5p, 64 chips in a 4x4x4 torus."""

    name: str
    generation: TpuGeneration
    grid: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.grid)

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.prefix}:{'x'.join(map(str, self.grid))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        # Full-size dimensions (4 chips on a 3-D cube side, 16 on a 2-D pod side) are tori.
        full = 4 if self.generation.dims == 3 else 16
        w = tuple(d >= full and self.num_chips >= full**self.generation.dims for d in self.grid)
        return (w + (False,) * 3)[:3]


def parse_topology(name: str) -> Topology:
    """`v5p-128`, `v4-8`, `v5e-16` / `v5litepod-16`, `v6e-64` -> Topology.

    Raises PlannerError naming the supported sizes when the name is not a standard slice.
    """
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise PlannerError(
            f"Unknown topology {name!r}; use <generation>-<size> with generation one of "
            f"{sorted(GENERATIONS)} (e.g. v5p-128, v4-8, v5e-16, v6e-64)."
        )
    gen = GENERATIONS[m.group(1)]
    size = int(m.group(2))
    table = _GRID_3D if gen.dims == 3 else _GRID_2D
    chips, rem = divmod(size, gen.cores_in_name)
    if rem or chips not in table:
        sizes = sorted(c * gen.cores_in_name for c in table)
        raise PlannerError(f"{name}: not a standard {m.group(1)} slice; sizes: {sizes}.")
    return Topology(name=name, generation=gen, grid=table[chips])


def _require_libtpu():
    if importlib.util.find_spec("libtpu") is None:
        raise PlannerError(
            "The AOT planner needs libtpu (the TPU compiler), which is not installed. Install "
            "it with: pip install 'loopcoder-jax[tpu]'  (or: pip install 'jax[tpu]' matching "
            "your jax version). No TPU is needed: libtpu compiles for TPU on a CPU machine."
        )


def topology_devices(topo: Topology) -> list:
    """Compile-only devices of the slice (one per chip). Needs libtpu; allocates nothing."""
    _require_libtpu()
    from jax.experimental import topologies

    # A compile-only client needs no TPU: skip the metadata-server queries and the
    # single-process lockfile (several planners, or tests, may run side by side).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # libtpu's init looks for these (set on a TPU VM) and, missing, prints a harmless
    # "unexpected worker hostname" error; a compile-only client is one local host.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    hosts = tuple(min(d, 2) for d in topo.grid) + (1,) * (3 - len(topo.grid))
    try:
        desc = topologies.get_topology_desc(
            topology_name=topo.libtpu_name,
            platform="tpu",
            chip_config_name=topo.generation.chip_config,
            chips_per_host_bounds=hosts[:2] + (1,),
            num_slices=1,
            wrap=topo.wrap,
        )
    except Exception as e:  # noqa: BLE001 - libtpu reports every failure as a runtime error
        raise PlannerError(
            f"libtpu could not describe {topo.name} ({topo.libtpu_name}): {e}"
        ) from e
    return list(desc.devices)


# ---------------------------------------------------------------------------- results
@dataclasses.dataclass
class Plan:
    """What the compiler says about one (config, topology, mesh, mode, shape)."""

    topology: str
    device_kind: str
    num_chips: int
    mesh: dict[str, int]
    mode: str
    seq_len: int
    global_batch: int
    remat: str
    attn_impl: str
    dtype: str
    # memory per chip, bytes
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    hbm_bytes: int
    # compute
    compiled_flops_per_chip: float | None
    analytic_flops: float
    optimal_seconds: float | None
    peak_flops_per_chip: float
    collectives: dict[str, dict[str, float]]
    compile_seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    # The model FLOPs with causal attention counted as (T + 1) / 2 keys per query (MaxText's
    # convention, T / 2, up to 1/T); `analytic_flops` charges all T keys (what dense XLA
    # attention computes). None: not computed (equal to analytic_flops for decode).
    analytic_flops_causal: float | None = None
    # When this plan does not fit: the nearest variant that does (see `suggest_fit`):
    # {"mesh", "global_batch", "grad_accum", "remat", "total_bytes", "flags", "tried"}, or
    # {"tried": n} when none of the n variants tried fits.
    suggestion: dict[str, Any] | None = None
    # How the counting compiles charged splash attention (`ATTENTION_COSTS`); None when the
    # program runs no splash or nothing was counted.
    attention_cost: str | None = None

    @property
    def total_bytes(self) -> int:
        """Per-chip HBM the program needs: arguments + outputs not aliased to them + the
        temporaries allocation. Conservative: the compiler's liveness-based peak
        (`peak_bytes`) is often lower, but it is the sum that must be allocated."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    @property
    def flops_ratio(self) -> float | None:
        if self.compiled_flops_per_chip is None:
            return None
        return self.compiled_flops_per_chip * self.num_chips / self.analytic_flops

    @property
    def has_estimate(self) -> bool:
        """The compiler gave a usable time estimate (absent, zero or negative ones are not:
        v6e's cost model returns negative times when counting is off)."""
        return self.optimal_seconds is not None and self.optimal_seconds > 0

    def _mfu(self, model_flops: float | None) -> float | None:
        if not self.has_estimate or not model_flops:
            return None
        return model_flops / (self.optimal_seconds * self.num_chips * self.peak_flops_per_chip)

    @property
    def mfu_bound(self) -> float | None:
        """Full-attention model FLOPs (all T keys per query) / (estimated step time x peak):
        an ESTIMATE. None without a positive time estimate."""
        return self._mfu(self.analytic_flops)

    @property
    def mfu_bound_causal(self) -> float | None:
        """As `mfu_bound`, with causal model FLOPs (~T/2 keys per query: MaxText's MFU)."""
        return self._mfu(self.analytic_flops_causal)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            total_bytes=self.total_bytes,
            fits=self.fits,
            flops_ratio=self.flops_ratio,
            mfu_bound_estimate=self.mfu_bound,
            mfu_bound_causal_estimate=self.mfu_bound_causal,
            has_estimate=self.has_estimate,
        )
        return out

    def report(self) -> str:
        gib = lambda b: f"{b / GiB:8.2f} GiB"
        aliased = f"  ({self.alias_bytes / GiB:.2f} GiB aliased to arguments)"
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines = [
            f"{self.mode} step on {self.topology} ({self.num_chips} x {self.device_kind}), "
            f"mesh {self.mesh}, batch {self.global_batch} x seq {self.seq_len}, "
            f"remat={self.remat}, attn={self.attn_impl}, dtype={self.dtype}",
            f"  compile time (host)   {self.compile_seconds:8.1f} s",
            "  HBM per chip (compiler memory analysis):",
            f"    arguments           {gib(self.argument_bytes)}",
            f"    outputs             {gib(self.output_bytes)}"
            + (aliased if self.alias_bytes else ""),
            f"    temporaries         {gib(self.temp_bytes)}",
            f"    total               {gib(self.total_bytes)}  of {gib(self.hbm_bytes).strip()}"
            f"  -> {verdict} ({100 * self.total_bytes / self.hbm_bytes:.0f}%)",
        ]
        if self.peak_bytes:
            lines.append(f"    (compiler's live peak {gib(self.peak_bytes).strip()})")
        total_tf = self.analytic_flops / 1e12
        lines.append(
            f"  analytic model FLOPs  {total_tf:10.1f} TFLOP per step (all chips; full "
            "attention: T keys per query)"
        )
        if self.analytic_flops_causal is not None:
            lines.append(
                f"                        {self.analytic_flops_causal / 1e12:10.1f} TFLOP per step "
                "(causal: T/2 keys per query, MaxText's MFU convention)"
            )
        if self.compiled_flops_per_chip is not None:
            compiled_tf = self.compiled_flops_per_chip * self.num_chips / 1e12
            lines.append(
                f"  compiled FLOPs        {compiled_tf:10.1f} TFLOP per step "
                f"(ratio {self.flops_ratio:.2f} x analytic full-attention FLOPs)"
            )
        if self.has_estimate:
            mfu = f"MFU bound {100 * self.mfu_bound:.1f}% on full-attention FLOPs"
            if self.mfu_bound_causal is not None:
                mfu = (
                    f"MFU bound {100 * self.mfu_bound_causal:.1f}% on causal FLOPs, "
                    f"{100 * self.mfu_bound:.1f}% on full-attention FLOPs"
                )
            lines.append(
                f"  compiler estimate     {self.optimal_seconds * 1e3:10.1f} ms per step "
                f"(ESTIMATE) -> {mfu} (ESTIMATES)"
                + (f"; splash charged as --attention-cost {self.attention_cost}"
                   if self.attention_cost else "")
            )  # fmt: skip
        else:
            lines.append(
                "  compiler estimate     no estimate ("
                + (
                    "none counted"
                    if self.optimal_seconds is None
                    else "the compiler gave a non-positive time"
                )
                + "; count FLOPs, i.e. drop --no-flop-count, for one)"
            )
        if self.collectives:
            lines.append("  collectives in the compiled HLO (loop bodies counted once):")
            for kind, c in sorted(self.collectives.items()):
                lines.append(f"    {kind:20s} {int(c['count']):5d} ops {gib(c['bytes'])}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.suggestion and "flags" in self.suggestion:
            g = self.suggestion
            lines.append(
                f"  nearest plan that fits: {g['flags']}  ({g['total_bytes'] / GiB:.1f} GiB per "
                f"chip of {self.hbm_bytes / GiB:.0f}; {g['tried']} "
                f"variant{'s' if g['tried'] != 1 else ''} compiled)"
            )
        elif self.suggestion:
            tried = self.suggestion["tried"]
            lines.append(
                (
                    f"  nearest plan that fits: none of the {tried} variants tried "
                    if tried
                    else "  nearest plan that fits: no variant to try "
                )
                + "(all chips on fsdp, remat=full, one sequence per batch shard, gradient "
                "accumulation, the sequence split over chips) fits: use a bigger slice or a "
                "shorter sequence"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------- HLO parsing
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
}  # fmt: skip
_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<kind>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<start>-start)?\("
)
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def _shape_bytes(shape: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * _DTYPE_BYTES.get(dtype, 4))
    return out


def collectives_in_hlo(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count", "bytes"}} of the collectives in compiled HLO text.

    Bytes are each op's result size per chip (for async `-start` ops, the largest buffer of
    the result tuple: the gathered / reduced array). Ops inside a while body count once.
    """
    out: dict[str, dict[str, float]] = {}
    for m in _COLLECTIVE.finditer(hlo_text):
        sizes = _shape_bytes(m.group("shape"))
        entry = out.setdefault(m.group("kind"), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += max(sizes) if sizes else 0
    return out


# ---------------------------------------------------------------------------- programs
def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _lower_train(exp: ExperimentConfig, mesh: Mesh, rules):
    from loopcoder_jax import training

    model = training.experiment_model(exp.model, exp.runtime)
    tc = exp.train
    training.validate(model, mesh, rules, tc)
    optimizer = training.make_optimizer(tc)
    abstract_state, state_sh = training.state_shardings(model, optimizer, mesh, rules)
    batch = training.abstract_batch(tc.batch_size, tc.seq_len, mesh, rules)
    step = training.make_train_step(model, optimizer, mesh, rules, train_cfg=tc)
    return step.lower(_abstract(abstract_state, state_sh), batch)


def _lower_inference(exp: ExperimentConfig, mesh: Mesh, rules, mode: str):
    from loopcoder_jax import cache as cache_lib
    from loopcoder_jax.model import LoopCoder

    model = LoopCoder(exp.model, exp.runtime)
    b, t = exp.train.batch_size, exp.train.seq_len
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    p_sh = sh.param_shardings(boxed, mesh, rules)
    params = _abstract(nn.unbox(boxed), p_sh)
    row = NamedSharding(mesh, nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH), rules))
    cache_dtype = jnp.dtype(exp.runtime.dtype)
    abstract_cache = jax.eval_shape(lambda: cache_lib.init_cache(exp.model, b, t, cache_dtype))
    cache_sh = jax.tree.map(
        lambda axes: NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules)),
        cache_lib.CACHE_AXES,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    if mode == "prefill":
        ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=row)

        def prefill(params, ids):
            return model.apply({"params": params}, ids, method=LoopCoder.prefill, max_length=t)

        fn = jax.jit(prefill, in_shardings=(p_sh, row), out_shardings=(None, cache_sh))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return fn.lower(params, ids)
    tok_sh = NamedSharding(mesh, nn.logical_to_mesh_axes((sh.BATCH, None), rules))
    ids = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=tok_sh)

    def decode(params, ids, cache):
        return model.apply({"params": params}, ids, cache, method=LoopCoder.decode_step)

    fn = jax.jit(
        decode,
        in_shardings=(p_sh, tok_sh, cache_sh),
        out_shardings=(None, cache_sh),
        donate_argnums=(2,),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn.lower(params, ids, _abstract(abstract_cache, cache_sh))


def _lower(exp, mesh, rules, mode):
    if mode == "train":
        return _lower_train(exp, mesh, rules)
    return _lower_inference(exp, mesh, rules, mode)


# XLA:TPU may turn an FSDP-sharded matmul into a loop over the shards ("windowed einsum": the
# all-gather or reduce-scatter overlapped with compute, `windowed_dot_general_body_*` in the
# HLO). cost_analysis counts a loop body once, so such a program reports a fraction of its
# FLOPs (dense7b on v5p-16, fsdp=8: 0.83x the same per-chip work on v5p-8). The counting
# compiles turn it off; the arithmetic is the same either way.
COUNTING_COMPILER_OPTIONS_TPU = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


# How counting compiles charge splash attention (`kernels/cost_standin.counting`): "kernel",
# splash's own block-sparse work (`kernels/splash_cost.py`), is what runs on the TPU and is
# charged alike with the sequence whole or sharded; "dense" is MaxText's dot-product form,
# an upper bound, and what a comparison with MaxText's estimate needs (`--vs-maxtext`).
ATTENTION_COSTS = ("kernel", "dense")
DEFAULT_ATTENTION_COST = "kernel"


def _counting_cost(exp, depth: int, mesh, rules, mode, devices,
                   attention_cost: str = DEFAULT_ATTENTION_COST):  # fmt: skip
    """(FLOPs per chip, seconds) of the step with `depth` unrolled layers (`_counting_config`)."""
    ca = _counting_cost_analysis(exp, depth, mesh, rules, mode, devices, attention_cost)
    return ca.get("flops"), ca.get("optimal_seconds")


def _counting_cost_analysis(exp, depth: int, mesh, rules, mode, devices,
                            attention_cost: str = DEFAULT_ATTENTION_COST) -> dict:  # fmt: skip
    """The compiler's cost_analysis dict of the depth-`depth` counting compile.

    Where the real program runs splash (attn_impl auto/splash on a TPU), attention is charged
    as `attention_cost` says (`ATTENTION_COSTS`): splash's block work through cost-only
    kernels, or the dense dot-product stand-in. Neither is the reference's float32 core, whose
    [T, S] HBM traffic splash does not have. A program that really runs XLA attention
    (attn_impl=xla) is costed as it is."""
    from loopcoder_jax.kernels import cost_standin

    if attention_cost not in ATTENTION_COSTS:
        raise PlannerError(f"attention cost {attention_cost!r}; choose one of {ATTENTION_COSTS}.")
    splash = exp.runtime.attn_impl != AttnImpl.XLA and devices[0].platform == "tpu"
    charge = attention_cost if splash else None
    with cost_standin.counting(charge) if charge else contextlib.nullcontext():
        lowered = _lower(_counting_config(exp, depth, keep_splash=charge == "kernel"), mesh,
                         rules, mode)  # fmt: skip
    options = COUNTING_COMPILER_OPTIONS_TPU if devices[0].platform == "tpu" else None
    ca = lowered.compile(compiler_options=options).cost_analysis()
    if isinstance(ca, list):  # older jax: one dict per program
        ca = ca[0] if ca else {}
    return dict(ca or {})


def counting_estimate(exp: ExperimentConfig, topology: str, mode: str = "train",
                      devices: Sequence | None = None,
                      attention_cost: str = DEFAULT_ATTENTION_COST) -> dict:  # fmt: skip
    """The step's FLOPs, time and bytes per chip from the depth-1/2 counting compiles alone
    (no full compile, so no memory figures): c1 + (L - 1) * (c2 - c1) for each, plus the
    per-layer differences. What `plan` reports as FLOPs and time, in a fraction of its time."""
    topo = parse_topology(topology)
    devices = list(devices) if devices is not None else topology_devices(topo)
    mesh = sh.make_mesh(exp.mesh, devices)
    rules = sh.get_rules(exp.mesh.rules)
    c1, c2 = (
        _counting_cost_analysis(exp, d, mesh, rules, mode, devices, attention_cost) for d in (1, 2)
    )
    layers = exp.model.num_hidden_layers
    out = {"mesh": dict(mesh.shape), "num_chips": len(devices)}
    for key, name in (("flops", "flops"), ("optimal_seconds", "seconds"),
                      ("bytes accessed", "bytes")):  # fmt: skip
        a, b = c1.get(key), c2.get(key)
        out[name] = None if None in (a, b) else a + (layers - 1) * (b - a)
        out[name + "_per_layer"] = None if None in (a, b) else b - a
    return out


def _cost(compiled) -> tuple[float | None, float | None]:
    ca = compiled.cost_analysis()
    if isinstance(ca, list):  # older jax: one dict per program
        ca = ca[0] if ca else {}
    ca = ca or {}
    return ca.get("flops"), ca.get("optimal_seconds")


def analytic_flops(exp: ExperimentConfig, mode: str, *, causal: bool = False) -> float:
    """Model FLOPs of one step (flops.py conventions, no remat recompute).

    causal=False charges every query all T keys of the causal branches (what dense XLA
    attention computes); True charges (T + 1) / 2 (the causal half: MaxText's MFU count).
    Decode reads the whole cache either way."""
    cfg, b, t = exp.model, exp.train.batch_size, exp.train.seq_len
    if mode == "train":
        return float(flops_lib.train_flops(cfg, b, t, causal_dense=not causal))
    if mode == "prefill":
        return float(flops_lib.forward_flops(cfg, b, t, causal_dense=not causal))
    # decode: one token per row against a full cache of t positions
    per_pair = 2 * 2 * cfg.num_attention_heads * cfg.head_dim
    pairs = cfg.loop_num * t + (cfg.loop_num - 1) * min(cfg.loop_window_size, t)
    attn = cfg.num_hidden_layers * b * pairs * per_pair
    return float(b * flops_lib.matmul_flops_per_token(cfg) + attn)


def _counting_config(exp: ExperimentConfig, depth: int, keep_splash: bool = False):
    """The step with `depth` unrolled layers, the loss in one chunk, no accumulation, and
    XLA attention: the compiler cannot cost jax's splash kernel (a custom call with no cost
    attached), so the splash program would count no attention work at all. `keep_splash`:
    trace the splash program anyway, its kernels costed by `kernels/splash_cost.py`."""
    attn_impl = exp.runtime.attn_impl if keep_splash else AttnImpl.XLA
    return exp.replace(
        model=exp.model.replace(num_hidden_layers=depth),
        runtime=exp.runtime.replace(scan_layers=False, attn_impl=attn_impl),
        train=dataclasses.replace(exp.train, loss_chunk=exp.train.seq_len, grad_accum=1),
    )


_OOM = re.compile(r"memory required for HLO temporaries \(([0-9.]+)([KMGT])\)")


def _parse_oom(message: str) -> int | None:
    """Bytes of temporaries from the TPU compiler's RESOURCE_EXHAUSTED message, if it is one."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    m = _OOM.search(message)
    if not m:
        return 0
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _plan_header(exp, topo, devices, mesh, mode) -> dict:
    """The Plan fields that describe what was compiled (shared by every verdict)."""
    return dict(
        topology=topo.name,
        device_kind=devices[0].device_kind,
        num_chips=len(devices),
        mesh=dict(mesh.shape),
        mode=mode,
        seq_len=exp.train.seq_len,
        global_batch=exp.train.batch_size,
        remat=exp.runtime.remat.value,
        attn_impl=exp.runtime.attn_impl.value,
        dtype=exp.runtime.dtype,
    )


def _oom_plan(exp, topo, devices, mesh, mode, temp_bytes, seconds) -> Plan:
    """The compiler refused the program for lack of HBM: report that as DOES NOT FIT."""
    return Plan(
        **_plan_header(exp, topo, devices, mesh, mode),
        argument_bytes=0,
        output_bytes=0,
        alias_bytes=0,
        temp_bytes=max(temp_bytes, topo.generation.hbm_bytes + 1),
        peak_bytes=0,
        hbm_bytes=topo.generation.hbm_bytes,
        compiled_flops_per_chip=None,
        analytic_flops=analytic_flops(exp, mode),
        analytic_flops_causal=analytic_flops(exp, mode, causal=True),
        optimal_seconds=None,
        peak_flops_per_chip=topo.generation.peak_flops,
        collectives={},
        compile_seconds=seconds,
        notes=[
            "the TPU compiler stopped with RESOURCE_EXHAUSTED: the temporaries alone need "
            f"{temp_bytes / GiB:.1f} GiB per chip (arguments not counted); use a bigger "
            "slice, more FSDP, remat=full, a shorter sequence or gradient accumulation"
        ],
    )


def _context_parallel_notes(exp: ExperimentConfig, mesh: Mesh, rules) -> list[str]:
    """What context parallelism (the sequence sharded) does to each chip's share of a step."""
    axes = sh.batch_spec(rules)[1]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    n = math.prod(mesh.shape[a] for a in axes)
    if n == 1:
        return []
    t, b = exp.train.seq_len, exp.train.batch_size
    per_chip = b * t // math.prod(mesh.shape.values())
    return [
        f"context parallel: each sequence is split {n} ways ({t // n} positions per chip); "
        f"{per_chip} tokens per chip per step (kernels/context_parallel.py)"
    ]


def plan(
    exp: ExperimentConfig,
    topology: str,
    mode: str = "train",
    *,
    count_flops: bool = True,
    devices: Sequence | None = None,
    count_only_if_fits: bool = False,
    attention_cost: str = DEFAULT_ATTENTION_COST,
) -> Plan:
    """Compiles `mode`'s step of `exp` for `topology` and returns the compiler's numbers.

    Args:
      exp: the experiment (model, runtime, mesh, train.batch_size = GLOBAL batch,
        train.seq_len). runtime.attn_impl AUTO resolves to splash on TPU.
      topology: a slice name such as "v5p-128" (see `parse_topology`).
      mode: "train" (training.make_train_step), "prefill" or "decode" (one token against a
        cache of seq_len positions).
      count_flops: also compile the depth-1/2 unrolled variants for FLOPs and time.
      devices: compile-only devices (default: from libtpu for `topology`).
      count_only_if_fits: skip the counting compiles when the program does not fit (the
        remat sweep: one compile for a policy that does not fit, three for one that does).
      attention_cost: how the counting compiles charge splash (`ATTENTION_COSTS`): "kernel",
        its block-sparse work; "dense", MaxText's dot-product form (an upper bound).
    """
    if mode not in ("train", "prefill", "decode"):
        raise PlannerError(f"mode={mode!r}; choose train, prefill or decode.")
    topo = parse_topology(topology)
    devices = list(devices) if devices is not None else topology_devices(topo)
    mesh = sh.make_mesh(exp.mesh, devices)
    rules = sh.get_rules(exp.mesh.rules)
    notes = _context_parallel_notes(exp, mesh, rules)
    t0 = time.perf_counter()
    lowered = _lower(exp, mesh, rules, mode)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        oom = _parse_oom(str(e))
        if oom is None:
            raise
        return _oom_plan(exp, topo, devices, mesh, mode, oom, time.perf_counter() - t0)
    compile_seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    flops_per_chip, seconds = _cost(compiled)
    depth = exp.model.num_hidden_layers
    total = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )  # fmt: skip
    if count_only_if_fits and total > topo.generation.hbm_bytes:
        count_flops = False
    try:
        if count_flops and depth <= 2:  # unrolling the whole stack is as cheap as extrapolating
            flops_per_chip, seconds = _counting_cost(
                exp, depth, mesh, rules, mode, devices, attention_cost
            )
            notes.append("FLOPs and time from a compile with the layers unrolled")
        elif count_flops:
            c1, c2 = (
                _counting_cost(exp, d, mesh, rules, mode, devices, attention_cost) for d in (1, 2)
            )
            extrapolate = lambda a, b: None if None in (a, b) else a + (depth - 1) * (b - a)
            flops_per_chip, seconds = extrapolate(c1[0], c2[0]), extrapolate(c1[1], c2[1])
            if seconds is not None and (seconds <= 0 or c2[1] < c1[1]):
                # Seen with the v4 cost model: a deeper program "estimated" faster.
                notes.append("the compiler's time estimates do not grow with depth: dropped")
                seconds = None
            notes.append(
                "FLOPs and time from depth-1/2 unrolled compiles extrapolated to "
                f"{depth} layers (cost_analysis counts a scan body once)"
            )
        elif exp.runtime.scan_layers and depth > 1:
            # cost_analysis costs a scan body once: such "FLOPs" and "time" describe one
            # layer plus the rest, and an MFU from them is off by ~depth (a 7B plan at 128K
            # printed 1945%). Report none rather than a wrong number.
            flops_per_chip = seconds = None
            notes.append(
                "FLOPs and time not counted (--no-flop-count; the compiler costs a scanned "
                "layer stack as one layer)"
            )
    except jax.errors.JaxRuntimeError as e:
        if _parse_oom(str(e)) is None:
            raise
        flops_per_chip = seconds = None
        count_flops = False
        notes.append(
            "the counting compiles (unrolled layers, attention as charged) ran out of HBM at this "
            "length: no FLOP count or time estimate"
        )
    charged = None
    if "tpu_custom_call" in hlo:
        charged = attention_cost if count_flops else None
        how = {
            "kernel": "FLOPs and time charge splash's own block-sparse work (the blocks its "
            "masks keep, at its tiles: kernels/splash_cost.py; a roofline, like the rest)",
            "dense": "FLOPs and time were counted with XLA dot-product attention in their place "
            "(--attention-cost dense, kernels/cost_standin.py: all keys per query, bf16 "
            "scores: an upper bound on the attention work)",
            None: "any FLOPs and time above leave attention out",
        }[charged]
        notes.append("Pallas kernels (splash attention) carry no cost of their own: " + how)
    peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
    return Plan(
        **_plan_header(exp, topo, devices, mesh, mode),
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        peak_bytes=int(peak),
        hbm_bytes=topo.generation.hbm_bytes,
        compiled_flops_per_chip=flops_per_chip,
        analytic_flops=analytic_flops(exp, mode),
        analytic_flops_causal=analytic_flops(exp, mode, causal=True),
        optimal_seconds=seconds,
        peak_flops_per_chip=topo.generation.peak_flops,
        collectives=collectives_in_hlo(hlo),
        compile_seconds=compile_seconds,
        notes=notes,
        attention_cost=charged,
    )


# ---------------------------------------------------------------------------- fit search
def fit_candidates(exp: ExperimentConfig, num_chips: int, mode: str) -> list[ExperimentConfig]:
    """Variants of `exp` to try when it does not fit, nearest first.

    Changes, alone then combined: a smaller per-chip micro-batch (for training the same global
    batch with more gradient accumulation, else one sequence per batch shard), every chip on
    fsdp (tensor=1, data=1, `sequence` kept), remat=full (train). Variants whose batch does
    not split over their mesh are left out.
    """
    m = exp.mesh
    meshes = [m]
    all_fsdp = MeshConfig(data=1, fsdp=-1, tensor=1, sequence=m.sequence, rules=m.rules)
    if sh.resolve_mesh_shape(m.axis_sizes, num_chips) != sh.resolve_mesh_shape(
        all_fsdp.axis_sizes, num_chips
    ):
        meshes.append(all_fsdp)
    remats = [exp.runtime.remat]
    if mode == "train" and exp.runtime.remat != Remat.FULL:
        remats.append(Remat.FULL)
    b, a = exp.train.batch_size, exp.train.grad_accum if mode == "train" else 1
    out, seen = [], set()
    for mesh_cfg in meshes:
        sizes = sh.resolve_mesh_shape(mesh_cfg.axis_sizes, num_chips)
        shards = sizes["data"] * sizes["fsdp"]  # the batch axes of every rules table
        batches = [(b, a)]
        if mode == "train":
            accum = a * 2
            while b % accum == 0 and (b // accum) % shards == 0:
                batches.append((b, accum))  # same global batch, smaller micro-batches
                accum *= 2
        if (shards, 1) not in batches:
            batches.append((shards, 1))  # one sequence per batch shard
        for remat in remats:
            for bb, aa in batches:
                if (bb // aa) % shards or bb % aa:
                    continue
                key = (tuple(sorted(sizes.items())), remat, bb, aa)
                if key in seen:
                    continue
                seen.add(key)
                out.append(
                    exp.replace(
                        mesh=mesh_cfg,
                        runtime=exp.runtime.replace(remat=remat),
                        train=dataclasses.replace(exp.train, batch_size=bb, grad_accum=aa),
                    )
                )

    if mode in ("train", "prefill"):
        out.extend(_context_parallel_candidates(exp, num_chips, mode, seen))

    def distance(e):
        # Fewest changes first; among equals, cheapest first: more gradient accumulation (the
        # same step, in smaller pieces), then the mesh, then remat=full (recompute), and a
        # smaller global batch (a different recipe) last; splitting the sequence (more
        # collectives per layer) after the other mesh changes, fewest ways first.
        shrunk = e.train.batch_size != b
        remat = e.runtime.remat != exp.runtime.remat
        mesh = e.mesh != m
        changed = shrunk + remat + mesh + (e.train.grad_accum != a and not shrunk)
        return (changed, shrunk, remat, mesh, e.mesh.sequence, e.train.grad_accum)

    return sorted(out[1:], key=distance)  # out[0] is `exp` itself


# Context parallelism is for long rows: a variant keeps at least this many tokens of each
# sequence per chip (below it the K/V gathers cost more than the activations they save).
_MIN_TOKENS_PER_SHARD = 2048


def _context_parallel_candidates(
    exp: ExperimentConfig, num_chips: int, mode: str, seen: set
) -> list[ExperimentConfig]:
    """Every chip on fsdp x `sequence` (context parallelism, kernels/context_parallel.py) for
    sequence = 2, 4, 8, ... ways beyond the one asked for: per-chip activations fall with the
    tokens each chip holds. The global batch is kept (more gradient accumulation) when it
    splits, else one sequence per batch shard."""
    b, a = exp.train.batch_size, exp.train.grad_accum if mode == "train" else 1
    t = exp.train.seq_len
    out, s = [], 2 * max(exp.mesh.sequence, 1)
    while num_chips % s == 0 and t % s == 0 and t // s >= _MIN_TOKENS_PER_SHARD:
        mesh_cfg = MeshConfig(data=1, fsdp=-1, tensor=1, sequence=s, rules=exp.mesh.rules)
        shards = num_chips // s
        if mode == "train" and b % shards == 0 and (b // shards) % a == 0:
            bb, aa = b, max(a, b // shards)  # same global batch, one row per shard a micro-step
        else:
            bb, aa = shards, 1
        sizes = sh.resolve_mesh_shape(mesh_cfg.axis_sizes, num_chips)
        key = (tuple(sorted(sizes.items())), exp.runtime.remat, bb, aa)
        if key not in seen:
            seen.add(key)
            out.append(
                exp.replace(
                    mesh=mesh_cfg,
                    train=dataclasses.replace(exp.train, batch_size=bb, grad_accum=aa),
                )
            )
        s *= 2
    return out


def _flags(exp: ExperimentConfig, num_chips: int, mode: str) -> str:
    sizes = sh.resolve_mesh_shape(exp.mesh.axis_sizes, num_chips)
    mesh = " ".join(f"{k}={v}" for k, v in sizes.items() if v > 1 or k == "fsdp")
    out = f"--mesh {mesh} --global-batch {exp.train.batch_size}"
    if mode == "train":
        out += f" --set train.grad_accum={exp.train.grad_accum} --remat {exp.runtime.remat.value}"
    return out


def suggest_fit(
    exp: ExperimentConfig,
    topology: str,
    mode: str,
    *,
    devices: Sequence | None = None,
    max_tries: int = 6,
) -> dict[str, Any]:
    """Compiles (memory only) the `fit_candidates` nearest first; the first that fits.

    Returns the Plan.suggestion dict. Each try is one compile of the real program (minutes
    for a 40B model on a small host): at most `max_tries`.
    """
    topo = parse_topology(topology)
    devices = list(devices) if devices is not None else topology_devices(topo)
    tried = 0
    for cand in fit_candidates(exp, len(devices), mode)[:max_tries]:
        tried += 1
        try:
            p = plan(cand, topology, mode, count_flops=False, devices=devices)
        except (sh.MeshError, ConfigError):
            continue
        if p.fits:
            return {
                "mesh": p.mesh,
                "global_batch": cand.train.batch_size,
                "grad_accum": cand.train.grad_accum,
                "remat": cand.runtime.remat.value,
                "total_bytes": p.total_bytes,
                "flags": _flags(cand, len(devices), mode),
                "tried": tried,
            }
    return {"tried": tried}


# ---------------------------------------------------------------------------- remat table
def remat_table(
    exp: ExperimentConfig,
    topology: str,
    mode: str = "train",
    *,
    count_flops: bool = True,
    devices: Sequence | None = None,
    policies: Sequence[Remat] | None = None,
    attention_cost: str = DEFAULT_ATTENTION_COST,
) -> list[tuple[str, Plan | str]]:
    """One plan per remat policy (all of `Remat` by default): [(policy, Plan or error)].

    A policy the runtime cannot compile (host offload without a pinned_host memory space)
    gives its error message instead of a plan. FLOPs and time estimates are counted only for
    the policies that fit (the counting compiles are the expensive part).
    """
    topo = parse_topology(topology)
    devices = list(devices) if devices is not None else topology_devices(topo)
    out: list[tuple[str, Plan | str]] = []
    for remat in policies or list(Remat):
        variant = exp.replace(runtime=exp.runtime.replace(remat=remat))
        try:
            p = plan(
                variant, topology, mode, count_flops=count_flops, devices=devices,
                count_only_if_fits=True, attention_cost=attention_cost,
            )  # fmt: skip
        except (jax.errors.JaxRuntimeError, ValueError, NotImplementedError) as e:
            out.append((remat.value, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            continue
        out.append((remat.value, p))
    return out


def format_remat_table(rows: list[tuple[str, Plan | str]]) -> str:
    lines = [
        "remat policy           HBM/chip GiB  fits  est. step (s)  MFU causal / full (ESTIMATES)",
    ]
    for name, p in rows:
        if isinstance(p, str):
            lines.append(f"{name:22s} cannot compile: {p}")
            continue
        est = f"{p.optimal_seconds:13.2f}" if p.has_estimate else "  no estimate"
        mfu = (
            f"{100 * p.mfu_bound_causal:.1f}% / {100 * p.mfu_bound:.1f}%"
            if p.mfu_bound_causal is not None
            else ""
        )
        lines.append(
            f"{name:22s} {p.total_bytes / GiB:12.1f}  {'yes' if p.fits else 'NO ':4s} {est}  {mfu}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def _parse_mesh(items: Sequence[str]) -> dict[str, int]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in sh.MESH_AXES:
            raise PlannerError(f"--mesh {item!r}: use AXIS=N with AXIS in {sh.MESH_AXES}.")
        out[key] = int(value)
    return out


# The remat policy a `--preset` plan uses when neither --remat nor --set runtime.remat says:
# the shipped recipe's (configs/<preset>.yaml). loop40b's comes from the remat sweep of its
# v5p-128 8K shape (docs/tpu.md "Remat sweep": the cheapest policy that fits with margin; the
# next one, save_qkv_out, needs 94% of HBM); the dense presets keep their YAMLs' `full` (the
# sweep did not cover them). Other presets (the CPU-sized ones) keep RuntimeConfig's `none`.
PRESET_REMAT = {
    "loop40b": Remat.SAVE_QKV,
    "dense40b": Remat.FULL,
    "dense14b": Remat.FULL,
    "dense7b": Remat.FULL,
}


def build_experiment(args) -> ExperimentConfig:
    """The experiment the CLI flags describe: YAML (or preset), then flag overrides."""
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.preset:
        raw = {"model": {"preset": args.preset}, "runtime": {"dtype": "bfloat16"}}
        if args.preset in PRESET_REMAT:
            raw["runtime"]["remat"] = PRESET_REMAT[args.preset].value
        exp = ExperimentConfig.from_dict(raw, overrides)
    else:
        exp = ExperimentConfig.from_yaml(args.config, overrides)
    if args.mesh:
        sizes = {a: 1 for a in sh.MESH_AXES}
        sizes.update(_parse_mesh(args.mesh))
        if not any(n == -1 for n in sizes.values()) and "fsdp" not in _parse_mesh(args.mesh):
            sizes["fsdp"] = -1  # unspecified fsdp fills the slice
        exp = exp.replace(mesh=MeshConfig(**sizes, rules=exp.mesh.rules))
    train = exp.train
    if args.seq:
        train = dataclasses.replace(train, seq_len=args.seq)
    if args.global_batch:  # one step of that many rows, unless --set train.grad_accum says
        accum = train.grad_accum if "train.grad_accum" in overrides else 1
        train = dataclasses.replace(train, batch_size=args.global_batch, grad_accum=accum)
    runtime = exp.runtime
    if args.remat:
        runtime = runtime.replace(remat=Remat(args.remat))
    if args.attn:
        runtime = runtime.replace(attn_impl=AttnImpl(args.attn))
    return exp.replace(train=train, runtime=runtime)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m loopcoder_jax.aot` command line (every option shows its default)."""
    from loopcoder_jax.cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="python -m loopcoder_jax.aot",
        description="Compile a LoopCoder step for a TPU topology on this machine (no TPU "
        "needed) and print per-chip HBM, compiled vs analytic FLOPs, the compiler's time "
        "estimate and the collectives.",
        formatter_class=HelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--config", help="experiment YAML, configs/<x>.yaml (default: the tiny embedded run)"
    )
    src.add_argument(
        "--preset", help="model preset instead of a YAML, e.g. loop40b (default: use --config)"
    )
    p.add_argument("--topology", required=True, help="slice, e.g. v5p-128, v4-8, v5e-16, v6e-64")
    p.add_argument(
        "--mesh", nargs="*", default=[],
        help="AXIS=N ... over data fsdp tensor sequence (default: the config's mesh)",
    )  # fmt: skip
    p.add_argument("--seq", type=int, help="sequence length (default: the config's seq_len)")
    p.add_argument(
        "--global-batch", type=int,
        help="global batch in sequences (default: the config's batch_size)",
    )  # fmt: skip
    p.add_argument(
        "--mode", default="train", choices=("train", "prefill", "decode"), help="step to compile"
    )
    p.add_argument(
        "--remat", choices=[r.value for r in Remat],
        help="remat policy (default: the config's runtime.remat; for --preset, the shipped "
        "recipe's, aot.PRESET_REMAT)",
    )  # fmt: skip
    p.add_argument(
        "--attn", choices=[a.value for a in AttnImpl],
        help="attention kernel (default: the config's runtime.attn_impl)",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], help="section.key=value override (repeatable)"
    )
    p.add_argument("--no-flop-count", action="store_true", help="skip the counting compiles")
    p.add_argument(
        "--attention-cost", choices=ATTENTION_COSTS, default=DEFAULT_ATTENTION_COST,
        help="how the counting compiles charge splash attention: kernel = its block-sparse "
        "work (what runs on the TPU); dense = XLA dot-product attention over every key, "
        "MaxText's estimate form (an upper bound)",
    )  # fmt: skip
    p.add_argument(
        "--no-suggest",
        action="store_true",
        help="when the plan does not fit, do not search (by compiling variants) for the "
        "nearest mesh / batch / remat that does",
    )
    p.add_argument(
        "--remat-sweep",
        action="store_true",
        help="plan every remat policy (memory for each; FLOPs and time for those that fit) "
        "and print one row each",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line instead")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ:
        # Compile-only: keep JAX from probing for an attached TPU on this host (libtpu gets
        # its host settings in `topology_devices`).
        jax.config.update("jax_platforms", "cpu")
    if args.remat_sweep:
        try:
            rows = remat_table(
                build_experiment(args), args.topology, args.mode,
                count_flops=not args.no_flop_count, attention_cost=args.attention_cost,
            )  # fmt: skip
        except (PlannerError, ConfigError, sh.MeshError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            for name, r in rows:
                print(json.dumps({"remat": name, **(r.to_json() if isinstance(r, Plan)
                                                    else {"error": r})}))  # fmt: skip
        else:
            print(format_remat_table(rows))
        return 0 if any(isinstance(r, Plan) and r.fits for _, r in rows) else 1
    try:
        exp = build_experiment(args)
        result = plan(
            exp, args.topology, args.mode, count_flops=not args.no_flop_count,
            attention_cost=args.attention_cost,
        )  # fmt: skip
        if not result.fits and not args.no_suggest:
            result.suggestion = suggest_fit(exp, args.topology, args.mode)
    except (PlannerError, ConfigError, sh.MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()) if args.json else result.report())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
