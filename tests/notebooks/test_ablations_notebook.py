"""notebooks/ablations.ipynb runs headless on CPU at the tiny budget (nbclient).

The kernel runs in the repository root with `LOOPCODER_NOTEBOOK_BUDGET=tiny`: it builds a
code-flow dataset from this checkout's git history, trains two ablation configs for a few
steps, and must write the loss-curve PNG and the results table.
"""

import ast
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
    setup = code[0].source
    assert "pip" in setup and setup.index("REPO_URL = ") < setup.index("import")  # set at the top


def _setup_functions():
    """The helper functions the setup cell defines, executed on their own (no install)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tree = ast.parse(nb.cells[1].source)
    keep = [n for n in tree.body if isinstance(n, ast.Import | ast.FunctionDef | ast.ClassDef)]
    namespace = {}
    exec(compile(ast.Module(keep, type_ignores=[]), "setup-cell", "exec"), namespace)
    return namespace


def test_setup_cell_validates_the_source_with_a_message_naming_the_fix(tmp_path):
    fns = _setup_functions()
    problem = fns["source_problem"]
    for url, local, expected in [
        ("", "", "both empty"),
        ("https://github.com/YOUR-ORG/loopcoder-jax", "", "is the placeholder"),
        ("github.com/me/loopcoder-jax", "", "not a git URL"),
        ("https://github.com/me/x", str(tmp_path), "Both REPO_URL and LOCAL_SOURCE"),
        ("", str(tmp_path / "missing"), "does not exist"),
        ("", str(tmp_path), "holds no configs/ablations"),
    ]:
        message = problem(url, local)
        assert message and expected in message and "Set REPO_URL" in message, (url, local)
    assert problem("https://github.com/me/loopcoder-jax", "") is None
    assert problem("", REPO_ROOT) is None  # a folder holding the project
    assert fns["find_checkout"](os.path.join(REPO_ROOT, "notebooks")) == REPO_ROOT
    # Shown in the notebook as one line, not a traceback.
    assert fns["SetupError"]("x")._render_traceback_() == ["SetupError: x"]


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
