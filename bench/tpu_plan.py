"""The TPU planning table of docs/tpu.md and BENCHMARKS.md, from the AOT planner.

    python bench/tpu_plan.py                      # every row (hours on a 2-core box)
    python bench/tpu_plan.py --rows 7b-4k-v5p16   # some rows
    python bench/tpu_plan.py --depth-ratio        # compile time of 14 vs 80 layers
    python bench/tpu_plan.py --markdown           # render the table from the results file
    python bench/tpu_plan.py --vs-maxtext ~/maxtext --preset dense40b --seq 8192 \
        --topology v5p-128 --fsdp 64 --remat full  # our estimate next to MaxText's

Each row compiles the real training step (`training.make_train_step`) of an official config
for a TPU slice with libtpu, on this CPU machine, and appends one JSON line (the planner's
`Plan.to_json()` plus the row id, host and git sha) to bench/results/tpu_plan.jsonl, so an
interrupted run keeps the rows it finished. Memory, FLOPs and times are the TPU compiler's
ESTIMATES for the named slice; nothing ran on a TPU.

The recommended mesh and remat policy of each row were chosen as: pure FSDP over the slice
(the 5120-wide models have 8 kv heads, so tensor parallelism beyond 8 cannot split them and
FSDP's all-gathers overlap well on ICI), the cheapest remat policy that fits (none, then
dots, then full), bf16 compute with f32 master params and Adam moments, one sequence per
chip (global batch = chips).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's compile-only init
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

from loopcoder_jax import aot  # noqa: E402
from loopcoder_jax.config import ExperimentConfig, MeshConfig  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "tpu_plan.jsonl")


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    preset: str
    seq: int
    topology: str
    fsdp: int
    remat: str
    tensor: int = 1
    attn: str = "auto"  # splash on TPU

    @property
    def global_batch(self) -> int:
        return self.fsdp  # one sequence per chip


ROWS = [
    Row("7b-4k-v5p16", "dense7b", 4096, "v5p-16", fsdp=8, remat="dots"),
    Row("7b-4k-v5e32", "dense7b", 4096, "v5e-32", fsdp=32, remat="full"),
    Row("7b-32k-v5p32", "dense7b", 32768, "v5p-32", fsdp=16, remat="full"),
    Row("14b-4k-v5p32", "dense14b", 4096, "v5p-32", fsdp=16, remat="dots"),
    Row("14b-4k-v6e64", "dense14b", 4096, "v6e-64", fsdp=64, remat="full"),
    Row("14b-32k-v5p64", "dense14b", 32768, "v5p-64", fsdp=32, remat="full"),
    Row("40b-4k-v5p128", "loop40b", 4096, "v5p-128", fsdp=64, remat="full"),
    Row("40b-4k-v4-256", "loop40b", 4096, "v4-256", fsdp=128, remat="full"),
    Row("40b-32k-v5p256", "loop40b", 32768, "v5p-256", fsdp=128, remat="full"),
]


def experiment(row: Row, layers: int | None = None) -> ExperimentConfig:
    raw = {
        "model": {"preset": row.preset},
        "runtime": {
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "remat": row.remat,
            "attn_impl": row.attn,
        },
    }
    exp = ExperimentConfig.from_dict(raw, {})
    if layers is not None:
        exp = exp.replace(model=exp.model.replace(num_hidden_layers=layers))
    return exp.replace(
        mesh=MeshConfig(data=1, fsdp=row.fsdp, tensor=row.tensor, sequence=1),
        train=dataclasses.replace(
            exp.train, seq_len=row.seq, batch_size=row.global_batch, grad_accum=1
        ),
    )


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, cwd=ROOT)
        return out.stdout.decode().strip()
    except OSError:
        return "unknown"


def run_rows(rows, count_flops: bool) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    for row in rows:
        t0 = time.perf_counter()
        try:
            plan = aot.plan(experiment(row), row.topology, "train", count_flops=count_flops)
            record = plan.to_json()
        except Exception as e:  # noqa: BLE001 - a failed row is a result too
            record = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        record.update(
            bench="tpu_plan", row=row.id, preset=row.preset, wall_seconds=time.perf_counter() - t0
        )
        _append(record)


def _mini(layers: int, attn: str, scan: bool = True) -> ExperimentConfig:
    """A 1024-wide LoopCoder (8 heads of 128, GQA 2, W=64, vocab 32k) on v5p-8, seq 4096."""
    raw = {
        "model": {
            "preset": "loop40b",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": layers,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "vocab_size": 32768,
        },
        "runtime": {"dtype": "bfloat16", "attn_impl": attn, "scan_layers": scan, "remat": "full"},
    }
    exp = ExperimentConfig.from_dict(raw, {})
    return exp.replace(
        mesh=MeshConfig(data=1, fsdp=4, tensor=1, sequence=1),
        train=dataclasses.replace(exp.train, seq_len=4096, batch_size=4, grad_accum=1),
    )


def _append(record: dict) -> None:
    record.update(
        host=f"{platform.node()} ({os.cpu_count()} CPUs)",
        git_sha=_git_sha(),
        date=time.strftime("%Y-%m-%d"),
    )
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def depth_ratio() -> None:
    """Compile time of the scanned train step at 14 vs 80 layers (the 7B and 40B depths) of
    the 1024-wide stand-in on v5p-8: the scan makes it independent of depth. (Full width
    compiles take ~10 min each on the 2-core dev box; width does not change the argument.)"""
    times = {}
    for layers in (14, 80):
        plan = aot.plan(_mini(layers, "auto"), "v5p-8", "train", count_flops=False)
        times[layers] = plan.compile_seconds
    _append(
        {
            "bench": "tpu_compile_depth",
            "compile_seconds_14": times[14],
            "compile_seconds_80": times[80],
            "ratio_80_over_14": times[80] / times[14],
        }
    )


def splash_vs_xla() -> None:
    """The 4-layer stand-in through splash and through XLA attention, layers unrolled (so the
    XLA program's cost analysis is complete), on v5p-8 at 4k tokens."""
    for attn in ("xla", "splash"):
        plan = aot.plan(_mini(4, attn, scan=False), "v5p-8", "train", count_flops=False)
        _append({"bench": "tpu_splash_vs_xla", **plan.to_json()})


def _counted(record: dict) -> bool:
    """FLOPs/time are complete: counted with unrolled layers, attention costed."""
    notes = " ".join(record.get("notes", []))
    unrolled = "unrolled" in notes
    attention_missing = "own cost estimate" in notes or "leave attention out" in notes
    return unrolled and not attention_missing


def markdown() -> str:
    """The table, from the newest record of each row in the results file."""
    latest = {}
    with open(RESULTS) as f:
        for line in f:
            r = json.loads(line)
            if r.get("bench") == "tpu_plan":
                latest[r["row"]] = r
    head = (
        "| model | seq | slice | mesh | remat | batch | HBM/chip (GiB) | fits | "
        "compiled/analytic FLOPs | est. step (s) | est. MFU bound, causal / full | "
        "host compile (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in ROWS:
        r = latest.get(row.id)
        mesh = f"fsdp={row.fsdp}" + (f", tensor={row.tensor}" if row.tensor > 1 else "")
        if r is None:
            cells = ["not run"] + [""] * 5
        elif "error" in r:
            cells = [f"error: {r['error'][:60]}"] + [""] * 5
        else:
            hbm = r["hbm_bytes"] / aot.GiB
            ok = _counted(r)
            sec = r.get("optimal_seconds") if ok else None
            if sec is not None and sec <= 0:  # v4's cost model: see aot.plan
                sec = None
            # Both analytic counts recomputed here: older records stored one convention or
            # the other under the same key.
            exp = experiment(row)
            full = aot.analytic_flops(exp, "train")
            causal = aot.analytic_flops(exp, "train", causal=True)
            compiled = r.get("compiled_flops_per_chip") if ok else None
            ratio = compiled * r["num_chips"] / full if compiled else None
            chips_peak = r["num_chips"] * r["peak_flops_per_chip"]
            mfu = full / (sec * chips_peak) if sec else None
            mfu_c = causal / (sec * chips_peak) if sec else None
            total = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
            cells = [
                f"{total / aot.GiB:.1f} / {hbm:.0f}",
                "yes" if total <= r["hbm_bytes"] else "**no**",
                f"{ratio:.2f}" if ratio else "n/a",
                # which attention charge made the estimate (records before --attention-cost:
                # the XLA stand-in, float32 scores until 2026-11-25)
                f"{sec:.2f} ({r.get('attention_cost') or 'XLA stand-in'})"
                if sec
                else "no estimate",
                f"{100 * mfu_c:.1f}% / {100 * mfu:.1f}%" if mfu else "no estimate",
                f"{r['compile_seconds']:.0f}",
            ]
        lines.append(
            f"| {row.preset} | {row.seq // 1024}k | {row.topology} | {mesh} | {row.remat} | "
            f"{row.global_batch} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- vs MaxText
# Runs inside a child python with the MaxText checkout on sys.path: captures the executable
# MaxText's train_compile compiles (whatever its version prints) and prints its numbers as
# one JSON line. argv[1] = checkout, argv[2:] = train_compile's own arguments.
_MAXTEXT_CHILD = r"""
import json, os, sys
root = sys.argv[1]
for sub in ("src", ""):
    if os.path.isdir(os.path.join(root, sub)):
        sys.path.insert(0, os.path.join(root, sub))
import importlib
import jax
mod = None
for name in ("maxtext.trainers.pre_train.train_compile", "MaxText.train_compile",
             "train_compile"):
    try:
        mod = importlib.import_module(name)
        break
    except ImportError:
        continue
if mod is None:
    sys.exit(f"no train_compile module under {root}")
captured = []
_compile = jax.stages.Lowered.compile
def _capture(self, *a, **k):
    out = _compile(self, *a, **k)
    captured.append(out)
    return out
jax.stages.Lowered.compile = _capture
try:
    mod.main(["train_compile.py", *sys.argv[2:]])
except SystemExit:
    pass
if not captured:
    sys.exit("MaxText's train_compile compiled nothing")
c = captured[-1]
ca = c.cost_analysis()
ca = (ca[0] if isinstance(ca, list) else ca) or {}
mem = c.memory_analysis()
import importlib.metadata as md
def version(pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None
print("MAXTEXT_PLAN " + json.dumps({
    "flops": ca.get("flops"), "optimal_seconds": ca.get("optimal_seconds"),
    "bytes_accessed": ca.get("bytes accessed"),
    "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
    "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
    "jax": jax.__version__, "libtpu": version("libtpu"),
}))
"""


def find_maxtext_config(checkout: str) -> str:
    """base.yml of a MaxText checkout (its location moved between versions)."""
    for rel in ("src/maxtext/configs/base.yml", "src/MaxText/configs/base.yml",
                "MaxText/configs/base.yml"):  # fmt: skip
        path = os.path.join(checkout, rel)
        if os.path.exists(path):
            return path
    raise SystemExit(f"{checkout}: no MaxText configs/base.yml; pass a MaxText checkout")


def maxtext_args(exp: ExperimentConfig, topology: str, layers: int, extra=()) -> list[str]:
    """train_compile key=value arguments for the dense Llama shape of `exp` at `layers`
    unrolled layers, with XLA (dot_product) attention like our counting compiles."""
    m, tc, mesh = exp.model, exp.train, exp.mesh
    chips = aot.parse_topology(topology).num_chips
    return [
        f"compile_topology={topology}", "compile_topology_num_slices=1",
        f"base_emb_dim={m.hidden_size}", f"base_num_query_heads={m.num_attention_heads}",
        f"base_num_kv_heads={m.num_key_value_heads}", f"head_dim={m.head_dim}",
        f"base_mlp_dim={m.intermediate_size}", f"base_num_decoder_layers={layers}",
        f"vocab_size={m.vocab_size}", "mlp_activations=['silu','linear']",
        f"normalization_layer_epsilon={m.rms_norm_eps}",
        f"logits_via_embedding={str(m.tie_word_embeddings).lower()}",
        f"max_target_length={tc.seq_len}", f"per_device_batch_size={tc.batch_size / chips:g}",
        f"ici_fsdp_parallelism={mesh.fsdp}", f"ici_tensor_parallelism={mesh.tensor}",
        f"ici_data_parallelism={mesh.data}", f"remat_policy={exp.runtime.remat.value}",
        "scan_layers=false", "attention=dot_product", f"dtype={exp.runtime.dtype}",
        "compile_xla_flags=" + " ".join(  # the counting compiles' flags (aot.py)
            f"--{k}={str(v).lower()}" for k, v in aot.COUNTING_COMPILER_OPTIONS_TPU.items()
        ),
        f"weight_dtype={exp.runtime.param_dtype}", "enable_dropout=false",
        "dataset_type=synthetic", "enable_checkpointing=false", "run_name=vs_loopcoder",
        *extra,
    ]  # fmt: skip


def run_maxtext(checkout: str, args: list[str], python: str = sys.executable) -> dict:
    cmd = [python, "-c", _MAXTEXT_CHILD, checkout, find_maxtext_config(checkout), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout)
    for line in p.stdout.splitlines():
        if line.startswith("MAXTEXT_PLAN "):
            return json.loads(line[len("MAXTEXT_PLAN ") :])
    raise SystemExit(f"MaxText's train_compile failed ({' '.join(args)}):\n{p.stderr[-3000:]}")


def extrapolate(c1: float | None, c2: float | None, layers: int) -> float | None:
    """Depth-1/2 compiles extrapolated to `layers`: c1 + (layers - 1) * (c2 - c1)."""
    return None if c1 is None or c2 is None else c1 + (layers - 1) * (c2 - c1)


def vs_maxtext(
    checkout: str,
    exp: ExperimentConfig,
    topology: str,
    extra=(),
    side: str = "both",
    python: str = sys.executable,
) -> dict:
    """Our depth-1/2 extrapolated estimate and MaxText's for the same dense shape, one dict.
    Ours is the counting compiles alone (`aot.counting_estimate`: the program the planner
    costs); no full compile, so no memory figures. Attention is charged as MaxText's estimate
    is made (`attention=dot_product`): `--attention-cost dense`, `kernels/cost_standin.py`.
    The default kernel charge would cost our splash blocks against MaxText's dense square."""
    layers = exp.model.num_hidden_layers
    t0 = time.perf_counter()
    if side == "maxtext":  # the mesh and chip count only; no compile
        topo = aot.parse_topology(topology)
        sizes = aot.sh.resolve_mesh_shape(exp.mesh.axis_sizes, topo.num_chips)
        ours = {k: None for k in ("flops", "seconds", "flops_per_layer", "seconds_per_layer",
                                  "bytes_per_layer")}  # fmt: skip
        ours.update(mesh={k: v for k, v in sizes.items()}, num_chips=topo.num_chips)
    else:
        ours = aot.counting_estimate(exp, topology, "train", attention_cost="dense")
    ours_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    missing = dict.fromkeys(("flops", "optimal_seconds", "bytes_accessed", "jax", "libtpu"))
    theirs = [
        missing
        if side == "ours"
        else run_maxtext(checkout, maxtext_args(exp, topology, d, extra), python)
        for d in (1, 2)
    ]
    theirs_wall = time.perf_counter() - t0
    per_layer = lambda key: (
        None if None in (theirs[0][key], theirs[1][key]) else theirs[1][key] - theirs[0][key]
    )
    return {
        "bench": "tpu_vs_maxtext",
        "topology": topology,
        "seq_len": exp.train.seq_len,
        "global_batch": exp.train.batch_size,
        "mesh": ours["mesh"],
        "remat": exp.runtime.remat.value,
        "layers": layers,
        "loop_num": exp.model.loop_num,
        "ours_optimal_seconds": ours["seconds"],
        "ours_flops_per_chip": ours["flops"],
        "ours_flops_per_layer": ours["flops_per_layer"],
        "ours_bytes_accessed_per_layer": ours["bytes_per_layer"],
        "ours_seconds_per_layer": ours["seconds_per_layer"],
        "maxtext_optimal_seconds": extrapolate(
            theirs[0]["optimal_seconds"], theirs[1]["optimal_seconds"], layers
        ),
        "maxtext_flops_per_chip": extrapolate(theirs[0]["flops"], theirs[1]["flops"], layers),
        "maxtext_flops_per_layer": per_layer("flops"),
        "maxtext_bytes_accessed_per_layer": per_layer("bytes_accessed"),
        "maxtext_seconds_per_layer": per_layer("optimal_seconds"),
        "maxtext_jax": theirs[0]["jax"],
        "maxtext_libtpu": theirs[0]["libtpu"],
        "analytic_flops_causal": aot.analytic_flops(exp, "train", causal=True),
        "chips": ours["num_chips"],
        "ours_wall_seconds": ours_wall,
        "maxtext_wall_seconds": theirs_wall,
    }


def format_vs_maxtext(r: dict) -> str:
    sec = lambda s: "no estimate" if not s or s <= 0 else f"{s:.2f} s"
    tf = lambda f: "n/a" if f is None else f"{f * r['chips'] / 1e12:.0f} TFLOP"
    lines = [
        f"train step, {r['topology']}, mesh {r['mesh']}, batch {r['global_batch']} x seq "
        f"{r['seq_len']}, remat={r['remat']}, {r['layers']} layers (depth-1/2 compiles "
        "extrapolated: s1 + (L-1)(s2 - s1)); compiler ESTIMATES, not measurements",
        f"  {'':10s} {'est. step':>12s} {'compiled FLOPs':>16s}",
        f"  {'ours':10s} {sec(r['ours_optimal_seconds']):>12s} {tf(r['ours_flops_per_chip']):>16s}",
        f"  {'MaxText':10s} {sec(r['maxtext_optimal_seconds']):>12s} "
        f"{tf(r['maxtext_flops_per_chip']):>16s}",
    ]
    if r["maxtext_jax"]:
        lines.append(f"  MaxText ran with jax {r['maxtext_jax']}, libtpu {r['maxtext_libtpu']}")
    if r["ours_optimal_seconds"] and r["maxtext_optimal_seconds"]:
        lines.append(
            f"  ours / MaxText: {r['ours_optimal_seconds'] / r['maxtext_optimal_seconds']:.3f}x"
        )
    gb = lambda x: "n/a" if x is None else f"{x / 1e9:.1f} GB"
    ms = lambda x: "n/a" if x is None else f"{x * 1e3:.1f} ms"
    lines.append(
        f"  per layer per chip: ours {gb(r.get('ours_bytes_accessed_per_layer'))} "
        f"{ms(r.get('ours_seconds_per_layer'))}, MaxText "
        f"{gb(r.get('maxtext_bytes_accessed_per_layer'))} {ms(r.get('maxtext_seconds_per_layer'))}"
    )
    if r["loop_num"] > 1:
        lines.append(
            f"  note: MaxText has no loop; its column is the dense shape, ours runs "
            f"{r['loop_num']} loops"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="*", help=f"row ids (default: all): {[r.id for r in ROWS]}")
    p.add_argument("--no-flop-count", action="store_true")
    p.add_argument("--depth-ratio", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--splash-vs-xla", action="store_true")
    p.add_argument("--vs-maxtext", metavar="PATH", help="a MaxText checkout: compile both")
    p.add_argument("--preset", default="dense40b", help="--vs-maxtext: model preset")
    p.add_argument("--seq", type=int, default=8192, help="--vs-maxtext: sequence length")
    p.add_argument("--topology", default="v5p-128", help="--vs-maxtext: slice")
    p.add_argument("--fsdp", type=int, default=64, help="--vs-maxtext: fsdp (batch = fsdp)")
    p.add_argument("--remat", default="full", help="--vs-maxtext: remat policy (both sides)")
    p.add_argument("--maxtext-arg", action="append", default=[],
                   help="--vs-maxtext: extra key=value for MaxText's train_compile")  # fmt: skip
    p.add_argument("--maxtext-python", default=sys.executable,
                   help="--vs-maxtext: the python that has MaxText's dependencies")  # fmt: skip
    p.add_argument("--side", choices=("both", "ours", "maxtext"), default="both",
                   help="--vs-maxtext: compile one side only (each is 2 compiles)")  # fmt: skip
    args = p.parse_args()
    if args.vs_maxtext:
        # attn auto: the TPU program runs splash, charged as dense dot-product attention
        # (kernels/cost_standin.py), the form of MaxText's attention=dot_product estimate
        row = Row("vs-maxtext", args.preset, args.seq, args.topology, args.fsdp, args.remat)
        record = vs_maxtext(args.vs_maxtext, experiment(row), args.topology, args.maxtext_arg,
                            args.side, args.maxtext_python)  # fmt: skip
        record["side"] = args.side
        _append(record)
        print(format_vs_maxtext(record))
    elif args.markdown:
        print(markdown())
    elif args.splash_vs_xla:
        splash_vs_xla()
    elif args.depth_ratio:
        depth_ratio()
    else:
        wanted = set(args.rows or [r.id for r in ROWS])
        unknown = wanted - {r.id for r in ROWS}
        if unknown:
            sys.exit(f"unknown rows {sorted(unknown)}")
        order = args.rows or [r.id for r in ROWS]  # in the order asked for
        by_id = {r.id: r for r in ROWS}
        run_rows([by_id[i] for i in order], count_flops=not args.no_flop_count)


if __name__ == "__main__":
    main()
