"""The sandbox against hostile programs: each must be contained, reported with its cause, and
the harness must go on. Checked from outside the jail (files that must not exist, a listening
socket that must see no connection, processes that must be gone, a sibling that must live).

These tests need the isolation they check: as root (CI), the `namespaces` mode. Where the
machine cannot provide it they fail, saying which mode was found (docs/evaluation.md).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from loopcoder_jax.evaluate.sandbox import MODES, Limits, Sandbox, probe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 2.0


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(Limits(timeout_s=TIMEOUT, memory_mb=512, nproc=16, max_output_bytes=4096))
    return sb


def _marker() -> str:
    """A unique `sleep` argument: find the process by its command line later."""
    return f"{random.randrange(10**6, 10**7)}.{os.getpid() % 1000:03d}"


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _gone(marker: str, within_s: float = 5.0) -> bool:
    """True once no process carries `marker` (the kernel reaps a dead namespace quickly)."""
    end = time.monotonic() + within_s
    while _processes_with(marker):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def _spawn_daemon(marker: str) -> str:
    """Program text: a detached `sleep` that tries to outlive the sample."""
    return f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"


def test_mode_is_full_isolation_as_root():
    mode = probe()
    assert mode in MODES
    if os.geteuid() == 0:
        assert mode == "namespaces", (
            f"running as root but the sandbox fell back to {mode!r}: unshare(2) is refused "
            "here, so network and file-system isolation are missing"
        )
    else:
        assert mode in ("userns", "rlimits")
    assert (Sandbox().warning is None) == (mode == "namespaces")


def test_plain_program_passes_and_output_is_captured(sandbox):
    r = sandbox.run("import os\nprint('hi', os.getcwd() == os.environ['HOME'])\n")
    assert r.passed and r.cause == "ok" and r.stdout == "hi True\n"
    r = sandbox.run("raise ValueError('nope')\n")
    assert not r.passed and r.cause == "error: ValueError" and r.detail == "ValueError: nope"


def _run_watching(sandbox, program: str, marker: str):
    """Runs `program`; returns (result, seconds, whether its daemon was seen running)."""
    with ThreadPoolExecutor(1) as pool:
        t = time.monotonic()
        future = pool.submit(sandbox.run, program)
        seen = False
        while not future.done():
            seen = seen or bool(_processes_with(marker))
            time.sleep(0.05)
        return future.result(), time.monotonic() - t, seen


def test_infinite_loop_times_out_and_leaves_nothing_behind(sandbox):
    marker = _marker()
    r, seconds, seen = _run_watching(
        sandbox, _spawn_daemon(marker) + "while True:\n    pass\n", marker
    )
    assert seen  # the daemon did start (so its absence below means something)
    assert seconds < TIMEOUT + 8
    assert r.status == "failed" and r.cause == "timeout"
    assert _gone(marker), _processes_with(marker)


def test_a_daemon_left_behind_dies_with_the_program(sandbox):
    marker = _marker()
    prog = _spawn_daemon(marker) + "import time\ntime.sleep(1)\n"
    r, _, seen = _run_watching(sandbox, prog, marker)
    assert seen and r.passed
    assert _gone(marker), _processes_with(marker)


def test_fork_bomb_is_contained(sandbox):
    marker = _marker()
    bomb = _spawn_daemon(marker) + (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    r, seconds, seen = _run_watching(sandbox, bomb, marker)
    assert seen and seconds < TIMEOUT + 8
    assert r.status == "failed" and r.cause == "timeout"
    assert _gone(marker), _processes_with(marker)
    # a bomb that does not catch the error dies of it
    r = sandbox.run("import os\nwhile True:\n    os.fork()\n")
    assert r.status == "failed" and r.cause in ("process limit", "timeout")


def test_unbounded_allocation_hits_the_memory_limit():
    sandbox = Sandbox(Limits(timeout_s=20, memory_mb=256))  # ends by memory, long before 20 s
    r = sandbox.run("chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 24))\n")
    assert r.status == "failed" and r.cause == "memory", r
    r = sandbox.run("x = bytearray(8 << 30)\n")
    assert r.cause == "memory"


def test_writes_outside_its_directory_fail(sandbox, tmp_path):
    # World-writable places the host can see, and this checkout, and the harness's HOME: as
    # root the file permissions would allow all of them; only the jail stops the writes.
    shared = []
    for base in ("/var/tmp", "/dev/shm", str(tmp_path)):
        if os.path.isdir(base):
            d = os.path.join(base, f"jailtest-{_marker()}")
            os.mkdir(d)
            os.chmod(d, 0o777)
            shared.append(d)
    targets = [os.path.join(d, "pwned") for d in shared]
    targets += [
        os.path.join(REPO, f"pwned-{_marker()}"),
        os.path.expanduser(f"~/pwned-{_marker()}"),
    ]
    prog = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n"
        "open('own.txt', 'w').write('mine')\n"
        "print('own', open(os.path.join(os.environ['HOME'], 'own.txt')).read())\n"
        "raise SystemExit(1)\n"
    )
    try:
        r = sandbox.run(prog)
        assert "WROTE" not in r.stdout, r.stdout
        assert r.stdout.count("refused") == len(targets)
        assert "own mine" in r.stdout  # its own directory is writable
        assert r.status == "failed"
        for t in targets:
            assert not os.path.exists(t), t
    finally:
        for d in shared:
            for t in os.listdir(d):
                os.remove(os.path.join(d, t))
            os.rmdir(d)


def test_no_network(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    prog = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "s.sendall(b'leak')\n"
    )
    try:
        r = sandbox.run(prog)
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected
    finally:
        server.close()
    assert r.status == "failed" and r.cause.startswith("error: ")
    assert "Network is unreachable" in r.detail or "Connection refused" in r.detail
    r = sandbox.run("import socket\nsocket.getaddrinfo('pypi.org', 443)\n")
    assert r.status == "failed" and r.cause == "error: socket.gaierror"


def test_killing_its_parent_or_everything_harms_nothing_outside(sandbox):
    sibling = subprocess.Popen(["sleep", "60"])  # a process of the harness's user
    try:
        r = sandbox.run(
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nraise SystemExit(3)\n"
        )
        assert r.status == "failed" and r.exit_code == 3  # the launcher survived to report it
        r = sandbox.run("import os, signal\nos.kill(-1, signal.SIGKILL)\nraise SystemExit(4)\n")
        assert r.status == "failed"
        r = sandbox.run("import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)\n")
        assert r.status == "failed" and r.cause == "killed (SIGKILL)"
        assert sibling.poll() is None, "a sandboxed program killed a process outside the jail"
        assert sandbox.run("print(1)\n").passed  # the harness goes on
    finally:
        sibling.kill()
        sibling.wait()


def test_output_flood_is_truncated(sandbox):
    r = sandbox.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert r.cause == "timeout" and r.truncated
    assert len(r.stdout) < 4096 + 100


def test_run_many_keeps_order_and_isolates_samples(sandbox):
    progs = [f"print({i})\n" if i % 2 else "raise SystemExit(1)\n" for i in range(6)]
    results = sandbox.run_many(progs, workers=2)
    assert [r.passed for r in results] == [bool(i % 2) for i in range(6)]
    assert [r.stdout for r in results if r.passed] == ["1\n", "3\n", "5\n"]


def test_the_interpreter_is_the_harness_one():
    assert Sandbox().python == os.path.realpath(sys.executable)
