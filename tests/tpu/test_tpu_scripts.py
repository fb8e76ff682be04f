"""tpu_scripts/*.sh: --help, --dry-run prints the exact gcloud commands, shellcheck-clean.

A `gcloud` stub that records any call sits first on PATH: a dry run must never call it.
"""

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tpu_scripts"
ALL = ["create", "setup", "weights", "launch", "logs", "stop", "delete"]
ENV = {
    "TPU_NAME": "lc-test",
    "ZONE": "us-east5-a",
    "PROJECT": "my-proj",
    "ACCELERATOR_TYPE": "v5p-16",
    "RUNTIME_VERSION": "v2-alpha-tpuv5",
}
FLAGS = ["--zone=us-east5-a", "--project=my-proj"]


@pytest.fixture
def run(tmp_path):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    marker = tmp_path / "gcloud-called"
    stub = stub_dir / "gcloud"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {marker}\nexit 1\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)

    def _run(script, *args, env=None, expect_rc=0):
        full_env = {k: v for k, v in os.environ.items() if k not in ENV}
        full_env.update(ENV, **(env or {}))
        full_env["PATH"] = f"{stub_dir}:{full_env['PATH']}"
        p = subprocess.run(
            ["bash", str(SCRIPTS / f"{script}.sh"), *args],
            capture_output=True,
            text=True,
            env=full_env,
            cwd=ROOT,
            timeout=60,
        )
        assert p.returncode == expect_rc, p.stdout + p.stderr
        assert not marker.exists(), f"gcloud was called: {marker.read_text()}"
        commands = [shlex.split(line[2:]) for line in p.stdout.splitlines() if line[:2] == "+ "]
        return p, commands

    return _run


@pytest.mark.parametrize("script", ALL)
def test_help(run, script):
    p, commands = run(script, "--help")
    assert p.stdout.startswith(f"Usage: tpu_scripts/{script}.sh")
    assert "--dry-run" in p.stdout and "TPU_NAME=lc-test" in p.stdout
    assert commands == []


def test_create_direct_and_queued(run):
    _, cmds = run("create", "--dry-run")
    assert cmds[0] == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "lc-test", *FLAGS,
        "--accelerator-type=v5p-16", "--version=v2-alpha-tpuv5",
    ]  # fmt: skip
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "lc-test"]
    _, cmds = run("create", "-n", "--no-wait", env={"QUEUED": "1", "SPOT": "1"})
    assert cmds == [
        [
            "gcloud", "compute", "tpus", "queued-resources", "create", "lc-test-qr", *FLAGS,
            "--node-id=lc-test", "--accelerator-type=v5p-16",
            "--runtime-version=v2-alpha-tpuv5", "--spot",
        ]
    ]  # fmt: skip


def _ssh(cmd, worker):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lc-test"]
    assert cmd[6:9] == [*FLAGS, f"--worker={worker}"]
    assert cmd[9].startswith("--command=")
    return cmd[9][len("--command=") :]


def test_setup_copies_checkout_and_installs_tpu_extra_everywhere(run):
    _, cmds = run("setup", "--dry-run")
    assert cmds[0][:3] == ["git", "-C", str(ROOT)] and "archive" in cmds[0]
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert cmds[1][-1] == "--worker=all"
    remote = _ssh(cmds[2], "all")
    assert "python3 -m venv $HOME/loopcoder-venv" in remote
    assert "pip install -q -e '$HOME/loopcoder-jax[tpu]'" in remote
    _, cmds = run("setup", "-n", env={"REPO_URL": "https://x/y.git", "REPO_REF": "v1"})
    assert len(cmds) == 1
    assert "git clone -q https://x/y.git $HOME/loopcoder-jax" in _ssh(cmds[0], "all")


def test_weights_converts_on_worker_0(run):
    _, cmds = run("weights", "-n", "--src", "gs://b/hf", "--dst", "gs://b/ckpt")
    remote = _ssh(cmds[0], "0")
    assert "gcloud storage cp -r 'gs://b/hf/*' /tmp/hf-checkpoint/" in remote
    assert remote.endswith(
        "python -m loopcoder_jax.convert hf-to-orbax /tmp/hf-checkpoint gs://b/ckpt "
        "--dtype bfloat16"
    )
    p, _ = run("weights", "-n", "--src", "x", expect_rc=2)
    assert "--src and --dst are required" in p.stderr


def test_launch_runs_the_same_command_on_every_worker(run):
    args = ["--config", "configs/loop7b.yaml", "--set", "train.run_dir=gs://b/run one"]
    _, cmds = run("launch", "train", "--dry-run", "--", *args, env={"JOB_ENV": "A=1"})
    remote = _ssh(cmds[0], "all")
    # The remote shell must see exactly train.py's arguments, spaces included.
    job = remote.split("nohup ", 1)[1].split(" > ", 1)[0]
    assert shlex.split(job) == [
        "$HOME/loopcoder-venv/bin/python",
        "train.py",
        "--distributed",
        *args,
    ]
    assert "export A=1;" in remote and "echo $! > $HOME/loopcoder-logs/train.pid" in remote
    _, cmds = run("launch", "infer", "-n", "--", "--checkpoint", "gs://b/c")
    assert "infer.py --checkpoint gs://b/c >" in _ssh(cmds[0], "all")
    p, _ = run("launch", "eval", "-n", expect_rc=2)
    assert "unknown job 'eval'" in p.stderr


def test_logs_stop_delete(run):
    _, cmds = run("logs", "train", "-n")
    assert _ssh(cmds[0], "0") == "tail -n 100 -F $HOME/loopcoder-logs/train.log"
    _, cmds = run("logs", "train", "-n", "--worker", "all", "--lines", "5")
    assert "tail -n 5 $HOME/loopcoder-logs/train.log" in _ssh(cmds[0], "all")
    _, cmds = run("stop", "train", "-n")
    assert "kill -TERM $(cat $HOME/loopcoder-logs/train.pid)" in _ssh(cmds[0], "all")
    _, cmds = run("delete", "-n")
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "lc-test", *FLAGS, "--quiet"]]
    _, cmds = run("delete", "-n", env={"QUEUED": "1"})
    assert cmds[0][3:6] == ["queued-resources", "delete", "lc-test-qr"] and "--force" in cmds[0]
    p, cmds = run("delete", expect_rc=2)  # no --yes, no --dry-run: refuses, calls nothing
    assert "pass --yes" in p.stderr and cmds == []


def test_unknown_option_is_an_error(run):
    p, _ = run("create", "--frobnicate", expect_rc=2)
    assert "unknown option '--frobnicate'" in p.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    p = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=SCRIPTS)
    assert p.returncode == 0, p.stdout + p.stderr
