"""tests/_strict_deps.py: on CI a skip for a missing dependency fails; hardware skips stay."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD_TESTS = '''
import pytest

needs_x = pytest.mark.skipif(True, reason="frobnicator (the `x` extra) not installed")

def test_importorskip():
    pytest.importorskip("no_such_module_for_loopcoder_tests")

@needs_x
def test_skipif_missing_tool():
    pass

def test_no_tpu():
    pytest.skip("needs a TPU backend")

@pytest.mark.xfail(reason="not installed in the xfail sense", strict=False)
def test_xfail():
    assert False

def test_passes():
    pass
'''
CHILD_MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_module_for_loopcoder_tests")\n'


def _run_child(tmp_path, ci: str | None):
    (tmp_path / "test_child.py").write_text(CHILD_TESTS)
    (tmp_path / "test_module_skip.py").write_text(CHILD_MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if ci is not None:
        env["CI"] = ci
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests._strict_deps", "-p", "no:cacheprovider",
         "--continue-on-collection-errors", "-q", "-rA", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return p.stdout + p.stderr


def test_on_ci_missing_dependency_skips_fail(tmp_path):
    out = _run_child(tmp_path, "true")
    # A skip raised in the test fails it; one raised in setup (skipif) or at collection
    # (module-level importorskip) is reported as an error. Either way the run fails.
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 2 errors" in out, out
    assert "FAILED test_child.py::test_importorskip" in out
    assert "ERROR test_child.py::test_skipif_missing_tool" in out
    assert "ERROR test_module_skip.py" in out
    assert "SKIPPED [1] test_child.py" in out and "needs a TPU backend" in out
    assert "Install it in .ci/run" in out


def test_off_ci_they_stay_skips(tmp_path):
    out = _run_child(tmp_path, None)
    assert "1 passed, 4 skipped, 1 xfailed" in out, out


@pytest.mark.parametrize(
    "value, on", [("true", True), ("1", True), ("yes", True), ("", False), ("0", False),
                  ("false", False), (None, False)]
)  # fmt: skip
def test_ci_values(monkeypatch, value, on):
    from tests import _strict_deps

    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert _strict_deps.strict() is on
