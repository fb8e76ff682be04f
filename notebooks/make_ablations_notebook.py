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
history and compares their **held-out loss** at equal training tokens and at equal training
FLOPs (a 2-loop model spends twice the layer FLOPs per token): `loop_num` 1 / 2 / 3, local
window W, gate variant, untied loops, BPTT gradient scale, dense-to-loop folded init. Every
variant is a YAML in `configs/ablations/` that differs from `loop2.yaml` in one knob.

**Scale:** these are 2-layer, 128-wide models trained for minutes. They show how the knobs
behave on small code data, not what they do at 7B-40B. See `docs/ablations.md`.

**Before you run:** set `REPO_URL` (a git URL of this project or your fork) **or**
`LOCAL_SOURCE` (a folder or `.zip` of the project you uploaded, e.g. on Google Drive) in the
first cell. Then *Runtime > Run all*. CPU, GPU and TPU runtimes all work (a TPU is detected and
used). The default run (the `CORE_CONFIGS` below on the `cpu` budget on a CPU runtime,
`accelerator` on a GPU/TPU) is sized to finish in under 10 minutes; `ALL_CONFIGS = True` trains
all 11 configs. `LOOPCODER_NOTEBOOK_BUDGET` (`tiny`, `cpu`, `accelerator`) overrides the budget.
""")

code("""
# ---- Set ONE of these two, once -------------------------------------------------------------
REPO_URL = ""      # e.g. "https://github.com/<you>/loopcoder-jax" (git clone, full history)
LOCAL_SOURCE = ""  # or an uploaded folder / .zip, e.g. "/content/drive/MyDrive/loopcoder-jax"
ALL_CONFIGS = False  # True: all 11 ablations (several times the default run time)
# ----------------------------------------------------------------------------------------------
import glob
import importlib
import importlib.util
import os
import subprocess
import sys
import zipfile

REPO_URL = os.environ.get("LOOPCODER_REPO_URL", REPO_URL).strip()
LOCAL_SOURCE = os.environ.get("LOOPCODER_SOURCE", LOCAL_SOURCE).strip()


class SetupError(Exception):
    \"\"\"A setup problem: shown as one message, without a traceback.\"\"\"

    def _render_traceback_(self):  # IPython prints this instead of the traceback
        return [f"SetupError: {self}"]


def find_checkout(start):
    \"\"\"The project checkout containing `start` (it has configs/ablations), or None.\"\"\"
    path = os.path.abspath(start)
    while True:
        if os.path.isdir(os.path.join(path, "configs", "ablations")):
            return path
        if os.path.dirname(path) == path:
            return None
        path = os.path.dirname(path)


def source_problem(repo_url, local_source):
    \"\"\"Why REPO_URL / LOCAL_SOURCE cannot be used (a message naming the fix), or None.\"\"\"
    fix = ("Set REPO_URL in the first cell to the project's git URL, e.g. "
           "'https://github.com/<you>/loopcoder-jax', or LOCAL_SOURCE to an uploaded folder or "
           ".zip of the project (Files pane, or Google Drive under /content/drive).")
    if repo_url and local_source:
        return "Both REPO_URL and LOCAL_SOURCE are set; keep one. " + fix
    if local_source:
        if not os.path.exists(local_source):
            return f"LOCAL_SOURCE={local_source!r} does not exist. " + fix
        if os.path.isdir(local_source) and find_checkout(local_source) is None:
            return (f"LOCAL_SOURCE={local_source!r} holds no configs/ablations: point it at the "
                    "project's root folder (the one with pyproject.toml). " + fix)
        if os.path.isfile(local_source) and not zipfile.is_zipfile(local_source):
            return f"LOCAL_SOURCE={local_source!r} is a file but not a .zip. " + fix
        return None
    if not repo_url:
        return "No project source: REPO_URL and LOCAL_SOURCE are both empty. " + fix
    if "YOUR-ORG" in repo_url or "<you>" in repo_url:
        return f"REPO_URL={repo_url!r} is the placeholder, not a repository. " + fix
    if not repo_url.startswith(("https://", "http://", "git@", "ssh://", "file://", "/")):
        return f"REPO_URL={repo_url!r} is not a git URL (https://..., git@..., or a path). " + fix
    return None


def tpu_runtime():
    \"\"\"True on a Colab / Cloud TPU VM (checked before jax is imported).\"\"\"
    return bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")
                or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


TPU_RUNTIME = tpu_runtime()
SOURCE_DIR = find_checkout(os.getcwd())  # running inside a checkout (CI, a local clone)
if SOURCE_DIR is None:
    problem = source_problem(REPO_URL, LOCAL_SOURCE)
    if problem:
        raise SetupError(problem)
    if LOCAL_SOURCE and os.path.isfile(LOCAL_SOURCE):  # an uploaded .zip
        with zipfile.ZipFile(LOCAL_SOURCE) as z:
            z.extractall("loopcoder-jax-src")
        found = glob.glob("loopcoder-jax-src/**/configs/ablations", recursive=True)
        if not found:
            raise SetupError(f"The zip {LOCAL_SOURCE} holds no configs/ablations: upload a zip "
                             "of the whole project (GitHub: Code > Download ZIP).")
        SOURCE_DIR = find_checkout(found[0])
    elif LOCAL_SOURCE:
        SOURCE_DIR = find_checkout(LOCAL_SOURCE)
    else:
        SOURCE_DIR = os.path.abspath("loopcoder-jax-src")
        if not os.path.isdir(SOURCE_DIR):
            r = subprocess.run(["git", "clone", "-q", REPO_URL, SOURCE_DIR],
                               capture_output=True, text=True)
            if r.returncode:
                raise SetupError(f"git clone {REPO_URL} failed: {r.stderr.strip()} "
                                 "Check REPO_URL (a private repository needs a token in the URL).")
if importlib.util.find_spec("loopcoder_jax") is None:
    extra = "[tpu]" if TPU_RUNTIME and importlib.util.find_spec("libtpu") is None else ""
    print(f"installing {SOURCE_DIR}{extra} (about a minute) ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{SOURCE_DIR}{extra}"],
                   check=True)
    importlib.invalidate_caches()
import loopcoder_jax  # noqa: E402  (after the install above)

print("loopcoder_jax", loopcoder_jax.__version__, "from", os.path.dirname(loopcoder_jax.__file__))
print("project source:", SOURCE_DIR, "| TPU runtime:", TPU_RUNTIME)
""")

code("""
# Backend: TPU, GPU or CPU (whatever this runtime has) and the run size that fits it.
import jax

BACKEND = jax.default_backend()
print("backend:", BACKEND, "| devices:", jax.device_count(), jax.devices()[0].device_kind)
if TPU_RUNTIME and BACKEND != "tpu":
    print("WARNING: this is a TPU runtime but JAX does not see the TPU; restart the runtime "
          "(Runtime > Restart session) so the freshly installed jax[tpu] is loaded.")
BUDGET = os.environ.get("LOOPCODER_NOTEBOOK_BUDGET") or (
    "cpu" if BACKEND == "cpu" else "accelerator"
)
OUT_DIR = os.path.abspath(os.environ.get("LOOPCODER_NOTEBOOK_OUT", "ablation_outputs"))
os.makedirs(OUT_DIR, exist_ok=True)
print("budget:", BUDGET, "| outputs in", OUT_DIR)
""")

code("""
# The ablation configs, and the repository whose git history becomes the training data.
from loopcoder_jax import ablations

CONFIG_DIR = os.path.join(SOURCE_DIR, "configs", "ablations")
SOURCE_REPO = SOURCE_DIR
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
# Which ablations to train: the core set (one per question: looping, window, gate, folding),
# or all with ALL_CONFIGS; two on the CI smoke budget.
NAMES = list(CONFIGS) if ALL_CONFIGS else list(ablations.CORE_CONFIGS)
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
    print(f"{r.name:<14} train loss {r.losses[0]:.3f} -> {r.final_loss:.3f}, "
          f"held-out loss {r.final_eval_loss:.3f}, {step_s}")
""")

code("""
# Curves, one panel per metric: training loss and held-out loss against training tokens,
# held-out loss against training FLOPs.
from IPython.display import Image, Markdown, display

PLOT_PATH = ablations.plot_curves(
    results, os.path.join(OUT_DIR, "ablation_curves.png"),
    title=f"LoopCoder ablations ({BUDGET} budget, {BACKEND})",
)
display(Image(PLOT_PATH))
""")

code("""
# Results table: held-out loss at equal tokens and at equal FLOPs (differences under ~0.05 are
# seed noise at this scale: compare with a second seed before reading anything into them).
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
