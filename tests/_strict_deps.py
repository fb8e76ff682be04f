"""On CI, a test skipped for a missing dependency is a failure, not a quiet skip.

A skip whose reason says a dependency is absent (`pytest.importorskip`'s "could not import",
or a reason containing "not installed") turns into a failure when the `CI` environment variable
is set to anything but "" / "0" / "false". Skips for missing hardware (the `tpu`/`gpu` markers,
"needs 8 (fake) devices") say no such thing and stay skips. Convention for new tests: a skip
for a missing package or tool says "... is not installed".

Hooked in by tests/conftest.py; a plain module so tests can load it into a child pytest.
"""

from __future__ import annotations

import os
import re

import pytest

_MISSING_DEP = re.compile(r"could not import|not installed|No module named", re.IGNORECASE)


def strict() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, "Skipped: ...")
        return str(longrepr[2])
    return str(longrepr)


def _fail_if_missing_dep(report, what: str) -> None:
    if not (strict() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report.longrepr)
    if _MISSING_DEP.search(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"CI is set, and {what} was skipped for a missing dependency: {reason}\n"
            "Install it in .ci/run (or the `test` extra); CI runs every test it can."
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_missing_dep(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips the whole module at collection
    _fail_if_missing_dep(outcome.get_result(), collector.nodeid)
