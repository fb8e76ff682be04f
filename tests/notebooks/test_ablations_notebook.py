"""notebooks/ablations.ipynb runs headless on CPU at the tiny budget (nbclient).

The kernel runs in the repository root with `LOOPCODER_NOTEBOOK_BUDGET=tiny`: it builds a
code-flow dataset from this checkout's git history, trains two ablation configs for a few
steps, and must write the loss-curve PNG and the results table.
"""

import os

import nbclient  # the [test] extra installs nbclient, nbformat, ipykernel, matplotlib
import nbformat

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "ablations.ipynb")


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "pip" in code[0].source and "git+" in code[0].source


def test_notebook_runs_headless_on_cpu(tmp_path, monkeypatch):
    out = tmp_path / "out"
    # The kernel inherits this environment: one CPU device (not the 8 fake ones of the tests),
    # the tiny budget, outputs under tmp, and this checkout first on the path.
    # Cheaper LLVM codegen: compilation dominates a tiny-budget run.
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("LOOPCODER_NOTEBOOK_BUDGET", "tiny")
    monkeypatch.setenv("LOOPCODER_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": REPO_ROOT}},
    )
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    png = out / "ablation_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = (out / "results.md").read_text()
    for name in ("loop1_dense", "loop2"):
        assert f"| {name} |" in table
    # The code-flow dataset was built from this checkout's history (when it is a git checkout;
    # otherwise the notebook falls back to the shipped corpus).
    if os.path.exists(os.path.join(REPO_ROOT, ".git")):
        assert (out / "codeflow.jsonl").stat().st_size > 0
    # The plot is shown inline too (an image output in the notebook).
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
