"""Issue 10, fault 5: the code-flow builder must never run a command a repository names.

A partial clone (`git clone --filter=blob:none`) lacks blobs and git fetches each one lazily
from the promisor remote when it is read (`cat-file --batch` does this). The fetch runs the
remote's transport: `remote.<name>.uploadpack` for local and file:// remotes (through the
shell), `core.sshCommand` for ssh ones. A hostile repository sets those in its own
`.git/config`; the builder must refuse partial clones with a clear message and run git with
every transport disallowed, so no fetch (and no command) ever happens.
"""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from loopcoder_jax.data import codeflow
from loopcoder_jax.data.codeflow import CodeFlowConfig, CodeFlowError, Summary, build_documents
from tests.data.test_codeflow import commit, git, write


def _hostile_partial_clone(tmp_path):
    """(clone path, marker path): a blob:none clone whose config runs `touch marker`."""
    work = str(tmp_path / "work")
    os.makedirs(work)
    git(work, "init", "-q")
    for i in range(6):  # enough first-parent history for transitions and FIM documents
        write(work, "src/a.py", "".join(f"def f{j}():\n    return {j}\n\n\n" for j in range(i + 2)))
        write(work, f"src/b{i}.py", f"X = {i}\n")
        commit(work, f"c{i}")
    origin = str(tmp_path / "origin.git")
    git(str(tmp_path), "clone", "-q", "--bare", work, origin)
    git(origin, "config", "uploadpack.allowFilter", "true")
    clone = str(tmp_path / "clone")
    git(str(tmp_path), "clone", "-q", "--no-checkout", "--filter=blob:none", f"file://{origin}",
        clone)  # fmt: skip
    marker = str(tmp_path / "PWNED")
    touch = f"touch {shlex.quote(marker)}"
    # The transport commands a lazy fetch would run, and a per-protocol override that
    # would re-allow file:// if only `protocol.allow=never` were given on the command line.
    git(clone, "config", "remote.origin.uploadpack", f"{touch}; git-upload-pack")
    git(clone, "config", "core.sshCommand", f"{touch}; ssh")
    git(clone, "config", "protocol.file.allow", "always")
    git(clone, "config", "protocol.allow", "always")
    return clone, marker


def test_partial_clone_setup_really_fetches_lazily(tmp_path):
    """Guards the test itself: without the builder's protections, reading a blob of this
    clone runs the planted command (so the next test can fail)."""
    clone, marker = _hostile_partial_clone(tmp_path)
    head_blob = git(clone, "rev-parse", "HEAD:src/a.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    subprocess.run(["git", "cat-file", "-p", head_blob], cwd=clone, env=env,
                   capture_output=True)  # fmt: skip
    assert os.path.exists(marker)


@pytest.mark.parametrize("kinds", [("transition",), ("file_fim", "repo_fim")])
def test_builder_refuses_partial_clone_and_runs_nothing(tmp_path, kinds):
    clone, marker = _hostile_partial_clone(tmp_path)
    with pytest.raises(CodeFlowError, match="partial clone") as err:
        list(build_documents([clone], CodeFlowConfig(kinds=kinds), Summary()))
    assert clone in str(err.value) and "git clone" in str(err.value)  # says what to do
    assert not os.path.exists(marker)


def test_git_calls_never_fetch_even_when_a_check_is_missed(tmp_path):
    """Defence in depth: reading a missing blob through `Git` fails instead of fetching it,
    whatever the repository's protocol.* config says."""
    clone, marker = _hostile_partial_clone(tmp_path)
    g = codeflow.Git.__new__(codeflow.Git)  # skip __init__'s partial-clone refusal
    g.repo, g._env = clone, codeflow._git_env()
    blob = git(clone, "rev-parse", "HEAD:src/a.py")
    with pytest.raises(subprocess.CalledProcessError):
        g.blobs([blob])
    assert not os.path.exists(marker)
