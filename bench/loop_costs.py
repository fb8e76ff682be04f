"""What the loop structure costs: bytes and estimated time of one 40B-Loop layer on a TPU slice.

    python bench/loop_costs.py                 # splash and xla, 6 compiles (~15 min, 2 cores)
    python bench/loop_costs.py --attn splash   # the program that runs on TPU only

Issue 12 item 3. Compiles the training step of a depth-1 stand-in of loop40b (hidden 5120, 40
query / 8 kv heads of 128, W = 64; MLP 512 wide and vocab 1024 so that the layer's attention
side dominates what is left) for v5p-128, fsdp=64, 64 x 8192 tokens, remat full, layers
unrolled, windowed einsum off (as the planner's counting compiles), in three variants:

  * loop_num=1             one loop: the loop-0 layer (causal attention);
  * loop_num=2, gate=fixed  + a loop >= 1 layer (global causal + local window), g = 0.5;
  * loop_num=2, gate=query  the released model: g = sigmoid(q . W + b) per head.

and prints the compiler's per-chip bytes accessed, FLOPs and `optimal_seconds` of each, their
differences (the loop >= 1 layer; the query gate), and the top-level HLO ops that touch the
gate (`loop_gate` in their metadata) with their operand + result bytes. Splash kernels are
custom calls the compiler does not cost (their operands and results are still bytes in the
per-op table); `--attn xla` is what the planner's counting compiles (its step estimate) see.
Compiler ESTIMATES for the slice, made on the CPU host with libtpu; nothing runs on a TPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from loopcoder_jax import aot  # noqa: E402
from loopcoder_jax import sharding as sh  # noqa: E402

VARIANTS = {
    "loop_num=1": ["model.loop_num=1"],
    "loop_num=2, gate=fixed": ["model.gate_type=fixed"],
    "loop_num=2, gate=query": ["model.gate_type=query"],
}
_ARRAY = re.compile(r"\b([a-z0-9]+)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")


def _bytes(shape: str) -> int:
    out = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in aot._DTYPE_BYTES:
            out += aot._DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return out


def gate_ops(hlo: str) -> list[tuple[str, str, int, int]]:
    """[(name, what the op is, result bytes, operand bytes)] of the top-level ops (outside
    fused computations) that compute or differentiate the gate."""
    comps: dict[str, list] = {}
    cur = None
    for line in hlo.splitlines():
        if line[:1] in ("%", "E") and line.rstrip().endswith("{") and "->" in line:
            cur = comps.setdefault(line.split()[1 if line.startswith("ENTRY") else 0][1:], [])
        elif line.strip() == "}":
            cur = None
        elif cur is not None and (m := _INSTR.match(line)):
            cur.append((m.group(1), m.group(2), m.group(3), m.group(4), line))
    shapes = {n: s for instrs in comps.values() for n, s, *_ in instrs}
    # Fused computations and reducers (to_apply=) are parts of another op, not ops.
    fused = {c for ins in comps.values() for *_, op, _, ln in ins
             for c in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", ln)
             if op == "fusion" or "to_apply=" in ln}  # fmt: skip
    out = []
    for name, instrs in comps.items():
        if name in fused:
            continue
        for n, shape, op, rest, line in instrs:
            calls = re.findall(r"calls=%([\w.\-]+)", line) if op == "fusion" else []
            body = "\n".join(ln for *_, ln in comps.get(calls[0], [])) if calls else ""
            skip = op in ("get-tuple-element", "bitcast", "parameter")
            if skip or "loop_gate" not in line + body:
                continue
            own = re.findall(r'op_name="([^"]*)"', line)
            what = own[0].split("DecoderLayer/")[-1] if own else op
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            in_bytes = sum(_bytes(shapes.get(o, "")) for o in operands)
            out.append((n, what, _bytes(shape), in_bytes))
    return out


def compile_variant(attn: str, sets: list[str]):
    args = aot.build_parser().parse_args(
        ["--preset", "loop40b", "--topology", "v5p-128", "--mesh", "fsdp=64", "--seq", "8192",
         "--global-batch", "64", "--remat", "full", "--attn", attn]
        + [a for kv in ["model.num_hidden_layers=1", "model.intermediate_size=512",
                        "model.vocab_size=1024", "runtime.scan_layers=false",
                        "train.loss_chunk=8192", *sets] for a in ("--set", kv)]
    )  # fmt: skip
    exp = aot.build_experiment(args)
    devices = aot.topology_devices(aot.parse_topology("v5p-128"))
    mesh = sh.make_mesh(exp.mesh, devices)
    compiled = aot._lower(exp, mesh, sh.get_rules(exp.mesh.rules), "train").compile(
        compiler_options=aot.COUNTING_COMPILER_OPTIONS_TPU
    )
    ca = compiled.cost_analysis()
    ca = (ca[0] if isinstance(ca, list) else ca) or {}
    return ca, compiled.as_text()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attn", nargs="*", default=["splash", "xla"], choices=("splash", "xla"))
    args = p.parse_args()
    for attn in args.attn:
        rows = {}
        for label, sets in VARIANTS.items():
            t0 = time.perf_counter()
            ca, hlo = compile_variant(attn, sets)
            rows[label] = (ca.get("bytes accessed", 0.0), ca.get("flops", 0.0),
                           ca.get("optimal_seconds", 0.0))  # fmt: skip
            record = {"attn": attn, "variant": label, "bytes": rows[label][0],
                      "flops": rows[label][1], "seconds": rows[label][2],
                      "compile_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            print(json.dumps(record), flush=True)
        print(f"\nattn={attn}: per chip, one layer, fwd + bwd (remat full), ESTIMATES")
        for label, (b, f, s) in rows.items():
            print(f"  {label:24s} {b / 1e9:8.2f} GB  {f / 1e12:7.2f} TFLOP  {s * 1e3:8.2f} ms")
        one, fixed, query = rows.values()
        print(f"  loop >= 1 layer (query - loop_num=1): {(query[0] - one[0]) / 1e9:.2f} GB, "
              f"{(query[2] - one[2]) * 1e3:.2f} ms")  # fmt: skip
        print(f"  query gate (query - fixed):          {(query[0] - fixed[0]) / 1e9:.3f} GB, "
              f"{(query[2] - fixed[2]) * 1e3:.3f} ms")  # fmt: skip
        print("  top-level ops touching the gate (gate=query): result + operand bytes")
        for name, what, out_b, in_b in gate_ops(hlo):
            print(f"    {(out_b + in_b) / 1e6:8.1f} MB  {name:30s} {what[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
