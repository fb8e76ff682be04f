"""Regenerates notebooks/ablations.ipynb, outputs cleared.

Run from the repository root: python notebooks/make_ablations_notebook.py
"""

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = []
md = lambda s: cells.append(new_markdown_cell(s.strip("\n")))
code = lambda s: cells.append(new_code_cell(s.strip("\n")))

md("""
# LoopCoder ablations (tiny scale)

Trains small variants of the LoopCoder loop design on code-flow data built from a real git
history and compares their loss curves: `loop_num` 1 / 2 / 3, local window W, gate variant,
untied loops, BPTT gradient scale, dense-to-loop folded init. Every variant is a YAML in
`configs/ablations/` that differs from `loop2.yaml` in one knob.

**Scale:** these are 2-layer, 128-wide models trained for minutes. They show how the knobs
behave on small code data, not what they do at 7B-40B. See `docs/ablations.md`.

Runtime: works on CPU, GPU and TPU Colab runtimes. `BUDGET` below (or the environment variable
`LOOPCODER_NOTEBOOK_BUDGET`) sets the run size: `tiny` (CI smoke run), `cpu`, `accelerator`.
""")

code("""
# Setup: install the package from the repository unless it is already importable (CI, local).
import importlib.util
import os
import subprocess
import sys

# Set REPO_URL to the repository (or fork) to install from.
REPO_URL = os.environ.get("LOOPCODER_REPO_URL", "https://github.com/YOUR-ORG/loopcoder-jax")
if importlib.util.find_spec("loopcoder_jax") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"], check=True)
import loopcoder_jax  # noqa: E402  (after the install above)

print("loopcoder_jax", loopcoder_jax.__version__, "from", os.path.dirname(loopcoder_jax.__file__))
""")

code("""
# Backend: TPU, GPU or CPU (whatever this runtime has) and the run size that fits it.
import jax

BACKEND = jax.default_backend()
print("backend:", BACKEND, "| devices:", jax.device_count(), jax.devices()[0].device_kind)
BUDGET = os.environ.get("LOOPCODER_NOTEBOOK_BUDGET") or (
    "cpu" if BACKEND == "cpu" else "accelerator"
)
OUT_DIR = os.path.abspath(os.environ.get("LOOPCODER_NOTEBOOK_OUT", "ablation_outputs"))
os.makedirs(OUT_DIR, exist_ok=True)
print("budget:", BUDGET, "| outputs in", OUT_DIR)
""")

code("""
# The ablation configs and a repository with real history to build code-flow data from:
# this checkout when the notebook runs inside one, otherwise a fresh clone of REPO_URL.
from loopcoder_jax import ablations

CONFIG_DIR = ablations.default_config_dir()
SOURCE_REPO = os.path.dirname(os.path.dirname(CONFIG_DIR)) if CONFIG_DIR else None
if CONFIG_DIR is None:
    SOURCE_REPO = os.path.abspath("loopcoder-jax-src")
    if not os.path.isdir(SOURCE_REPO):
        subprocess.run(["git", "clone", "-q", REPO_URL, SOURCE_REPO], check=True)
    CONFIG_DIR = os.path.join(SOURCE_REPO, "configs", "ablations")
CONFIGS = ablations.ablation_configs(CONFIG_DIR)
print(len(CONFIGS), "configs:", ", ".join(CONFIGS))
print("code-flow source repository:", SOURCE_REPO)
""")

code("""
# Code-flow dataset: commit transitions + file/repo-level FIM from the repository's history
# (docs/codeflow.md). Falls back to the corpus shipped in the package if that yields nothing.
import json

from loopcoder_jax.data import codeflow

small = BUDGET == "tiny"
cf_cfg = codeflow.CodeFlowConfig(
    transitions_per_repo=8 if small else 64,
    file_fim_per_repo=16 if small else 256,
    repo_fim_per_repo=4 if small else 64,
    seed=0,
)
DATA_PATH = os.path.join(OUT_DIR, "codeflow.jsonl")
summary = codeflow.Summary()
n_docs = 0
try:
    docs = codeflow.build_documents([SOURCE_REPO], cf_cfg, summary, names=["loopcoder-jax"])
    n_docs = codeflow.write_jsonl(docs, DATA_PATH)
    print(summary.format())
except codeflow.CodeFlowError as e:
    print("code-flow build failed:", e)
DATA_SOURCES = [DATA_PATH] if n_docs else []  # [] = the shipped corpus
print("training data:", DATA_SOURCES or "shipped corpus")
if n_docs:  # what a document looks like (a transition if there is one)
    with open(DATA_PATH) as f:
        records = [json.loads(line) for line in f]
    sample = next((r for r in records if r["kind"] == "transition"), records[0])
    print(f"--- {sample['kind']} {sample['paths']} ---")
    print(sample["text"][:800])
""")

code("""
# Which ablations to train: all of them, except on the CI smoke budget.
NAMES = list(CONFIGS)
if BUDGET == "tiny":
    NAMES = ["loop1_dense", "loop2"]
print(BUDGET, "budget:", ablations.BUDGETS[BUDGET], "->", NAMES)
""")

code("""
# Train. Each config runs through trainer.run (the loop behind train.py) into OUT_DIR/runs/<name>;
# folded_init first trains dense_4layer and folds it into the loop model's init.
results = ablations.run_all(
    NAMES, BUDGET, OUT_DIR, config_dir=CONFIG_DIR,
    extra_overrides={"data.sources": json.dumps(DATA_SOURCES)},
    progress=BUDGET != "tiny",
)
ablations.save_results(results, os.path.join(OUT_DIR, "results.json"))
for r in results:
    step_s = f"{r.seconds_per_step:.3f} s/step"
    print(f"{r.name:<14} loss {r.losses[0]:.3f} -> {r.final_loss:.3f}, {step_s}")
""")

code("""
# Loss curves.
from IPython.display import Image, Markdown, display

PLOT_PATH = ablations.plot_curves(
    results, os.path.join(OUT_DIR, "ablation_curves.png"),
    title=f"LoopCoder ablations ({BUDGET} budget, {BACKEND})",
)
display(Image(PLOT_PATH))
""")

code("""
# Results table (final loss = mean over the last 10% of steps; small differences are noise
# at this scale: compare with a second seed before reading anything into them).
table = ablations.results_table(results)
with open(os.path.join(OUT_DIR, "results.md"), "w") as f:
    f.write(table + "\\n")
display(Markdown(table))
""")

nb = new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nb.metadata["language_info"] = {"name": "python"}
nb.metadata["colab"] = {"provenance": []}
nb.metadata["accelerator"] = "GPU"
nbformat.validate(nb)
nbformat.write(nb, "notebooks/ablations.ipynb")
