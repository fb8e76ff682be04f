"""Runs untrusted Python programs (model completions) one per jailed subprocess.

    sb = Sandbox(Limits(timeout_s=10))          # picks the strongest isolation that works here
    result = sb.run("print(1 + 1)")             # Result(status="passed", cause="ok", ...)
    results = sb.run_many(programs, workers=2)

Each program runs in its own subprocess tree, started by `_jail.py` (read its docstring for
the mechanism), with:
  * a wall-clock timeout, after which the whole tree is killed (the launcher's process group
    with SIGKILL; in the namespace modes the jailed PID 1 then gets its parent-death SIGKILL
    and the kernel kills everything left in its PID namespace, also processes that called
    setsid() or double-forked);
  * rlimits: CPU seconds, address space, processes (RLIMIT_NPROC counts per uid, which is why
    the root modes run each program under its own random unprivileged uid: root ignores it),
    file size, open files, no core dumps;
  * a fresh temporary directory as cwd and HOME, a minimal environment, stdin = /dev/null;
  * in the `namespaces` / `userns` modes: no network (a new network namespace has only a
    down loopback), a read-only view of every file system except its own tmpfs, and a /proc
    that shows only its own processes;
  * stdout/stderr captured through pipes and truncated to `Limits.max_output_bytes` each
    (head and tail kept); the rest is read and dropped, so a chatty program cannot block.

The mode is chosen once per process by `probe()`: `namespaces` as root, `userns` when an
unprivileged user may create user namespaces, else `uid` (root) or `rlimits`, each weaker
mode with a logged warning (`Sandbox.warning`) saying what is not contained. `Result.cause`
says how a program ended: "ok", "timeout", "memory", "cpu time limit", "file size limit",
"process limit", "killed (SIGKILL)", "error: <exception type>", "sandbox error"; and
`Result.detail` the last line of stderr (the exception message).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

MODES = ("namespaces", "userns", "uid", "rlimits")
_JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jail.py")
_NS_WORKDIR = "/tmp/work"  # inside the jail's own tmpfs (namespace modes)
# Each jailed program gets a random uid/gid from this range (no passwd entry needed): RLIMIT_NPROC
# then counts only its own processes, and `kill(-1, ...)` inside reaches only its own tree.
_UID_BASE, _UID_SPAN = 0x5A000000, 1 << 24

WARNINGS = {
    "userns": "sandbox: running as an unprivileged user in a user namespace; RLIMIT_NPROC "
    "counts all of this user's processes (its budget is set above the current count).",
    "uid": "sandbox: namespaces are not available here (unshare refused), so programs run "
    "under a throwaway uid with rlimits only: the NETWORK IS REACHABLE and world-writable "
    "paths (/tmp, /dev/shm) are writable. Run as root on a host/VM that allows unshare(2) "
    "for full isolation.",
    "rlimits": "sandbox: neither namespaces nor a uid change are available (not root, "
    "unprivileged user namespaces disabled), so programs run with rlimits and a temp cwd "
    "only: they CAN WRITE YOUR FILES AND USE THE NETWORK. Only evaluate code you would run "
    "anyway, or run as root / enable user namespaces (sysctl kernel.unprivileged_userns_clone=1).",
}


class SandboxError(RuntimeError):
    """The sandbox cannot run programs here (e.g. no mode works); the message says why."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-program limits. Memory and processes multiply: the worst case is nproc x memory."""

    timeout_s: float = 10.0  # wall clock, for the whole tree
    memory_mb: int = 1024  # RLIMIT_AS of each process
    nproc: int = 16  # processes + threads of the program's uid (RLIMIT_NPROC)
    file_size_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    tmpfs_mb: int = 64  # size of its /tmp (namespace modes)
    max_output_bytes: int = 16384  # of stdout and of stderr each, kept (head + tail)

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "nproc", "file_size_mb", "open_files",
                     "tmpfs_mb", "max_output_bytes"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}.")


@dataclasses.dataclass
class Result:
    """How one program ended. `passed` iff it exited 0 within the limits."""

    status: str  # "passed" | "failed"
    cause: str  # "ok" or why it failed (see the module docstring)
    detail: str  # the last line of stderr (e.g. the exception message), or the setup error
    exit_code: int | None
    signal: str | None
    duration_s: float
    stdout: str
    stderr: str
    truncated: bool  # some output was dropped

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Capture:
    """Keeps the first and last `cap // 2` bytes of a stream."""

    def __init__(self, cap: int):
        self.half = max(cap // 2, 1)
        self.head, self.tail, self.dropped = bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.half:
                self.dropped += len(self.tail) - self.half
                del self.tail[: len(self.tail) - self.half]

    def text(self) -> str:
        middle = f"\n[... {self.dropped} bytes dropped ...]\n" if self.dropped else ""
        return (bytes(self.head).decode("utf-8", "replace") + middle
                + bytes(self.tail).decode("utf-8", "replace"))  # fmt: skip


def _user_tasks(uid: int) -> int:
    """Processes + threads of `uid` now (what RLIMIT_NPROC counts)."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return n


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(:.*)?$")


def _last_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _classify(timed_out: bool, sig: int | None, code: int | None, stderr: str) -> str:
    if timed_out:
        return "timeout"
    if sig is not None:
        return {
            signal.SIGXCPU: "cpu time limit",
            signal.SIGXFSZ: "file size limit",
        }.get(sig, f"killed ({signal.Signals(sig).name})")
    if code == 0:
        return "ok"
    last = _last_line(stderr)
    if "MemoryError" in last:
        return "memory"
    if "BlockingIOError" in last and "Errno 11" in last:
        return "process limit"  # fork() refused by RLIMIT_NPROC
    if m := _EXC_LINE.match(last):
        return f"error: {m.group(1)}"  # the exception type; `Result.detail` has the message
    return f"exit code {code}"


class Sandbox:
    """Runs Python programs in jails (see the module docstring). Thread-safe.

    mode: one of `MODES`, or "auto" (the strongest that works here, found by `probe`).
    python: the interpreter for the programs (default: this one); it must be readable and
      executable by an unprivileged uid in the root modes.
    """

    def __init__(self, limits: Limits = Limits(), *, mode: str = "auto", python: str | None = None):
        self.limits = limits
        self.python = os.path.realpath(python or sys.executable)
        if mode == "auto":
            mode = probe(self.python)
        elif mode not in MODES:
            raise SandboxError(f"Unknown sandbox mode {mode!r}; use one of {MODES} or 'auto'.")
        self.mode = mode
        self.warning = WARNINGS.get(mode)

    # ---------------------------------------------------------------- one program
    def run(self, program: str) -> Result:
        lim = self.limits
        root = os.geteuid() == 0
        uid = gid = None
        if root and self.mode in ("namespaces", "uid"):
            uid = gid = _UID_BASE + random.randrange(_UID_SPAN)
        host_dir = None
        if self.mode in ("namespaces", "userns"):
            workdir, tmpdir = _NS_WORKDIR, "/tmp"
        else:
            host_dir = tempfile.mkdtemp(prefix="loopcoder-sandbox-")
            workdir = tmpdir = os.path.join(host_dir, "work")
            os.mkdir(workdir, 0o700)
            os.chmod(host_dir, 0o711)  # the jail's uid must reach work/ (mkdtemp gives 0o700)
            if uid is not None:
                os.chown(workdir, uid, gid)
        nproc = lim.nproc if uid is not None else _user_tasks(os.getuid()) + lim.nproc
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": tmpdir,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }
        cfg = dict(
            mode=self.mode, uid=uid, gid=gid, workdir=workdir, python=self.python, env=env,
            cpu_seconds=int(lim.timeout_s) + 1, memory_bytes=lim.memory_mb << 20,
            file_size_bytes=lim.file_size_mb << 20, open_files=lim.open_files, nproc=nproc,
            tmpfs_bytes=lim.tmpfs_mb << 20,
            expose=_hidden_interpreter(self.python) if uid is not None else None,
        )  # fmt: skip
        try:
            result = self._launch(cfg, program)
            if self.mode == "uid" and result.cause == "timeout":
                _reap_uid(self.python, uid, gid)  # no PID namespace took the strays down with it
            return result
        finally:
            if host_dir is not None:
                shutil.rmtree(host_dir, ignore_errors=True)

    def _launch(self, cfg: dict, program: str) -> Result:
        lim = self.limits
        status_r, status_w = os.pipe()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _JAIL, json.dumps(cfg), str(status_w)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(status_w,), start_new_session=True, cwd="/", env={},
            )  # fmt: skip
        finally:
            os.close(status_w)
        try:
            proc.stdin.write(program.encode("utf-8", "surrogateescape"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out, err, status = _Capture(lim.max_output_bytes), _Capture(lim.max_output_bytes), []
        deadline = start + lim.timeout_s
        timed_out = self._pump(proc, status_r, out, err, status, deadline)
        duration = time.monotonic() - start
        os.close(status_r)
        report: dict = {}
        for line in b"".join(status).decode(errors="replace").splitlines():
            try:
                report.update(json.loads(line))
            except json.JSONDecodeError:
                continue
        stderr = err.text()
        if "setup_error" in report:
            code, sig = None, None
            cause = "sandbox error"  # `detail` says what failed
        elif "program_exit" in report or "program_signal" in report:
            code, sig = report.get("program_exit"), report.get("program_signal")
            cause = _classify(timed_out, sig, code, stderr)
        elif "exit" in report or "signal" in report:  # init died before the program ended
            code, sig = report.get("exit"), report.get("signal")
            cause = _classify(timed_out, sig, code, stderr)
        else:  # the launcher itself was killed (timeout, or a program of the same uid)
            code = None
            sig = -proc.returncode if (proc.returncode or 0) < 0 else None
            cause = "timeout" if timed_out else _classify(False, sig, proc.returncode, stderr)
        passed = cause == "ok"
        return Result(
            status="passed" if passed else "failed",
            cause=cause,
            detail=report.get("setup_error") or _last_line(stderr),
            exit_code=code,
            signal=signal.Signals(sig).name if sig else None,
            duration_s=round(duration, 3),
            stdout=out.text(),
            stderr=stderr,
            truncated=bool(out.dropped or err.dropped),
        )

    @staticmethod
    def _pump(proc, status_r, out, err, status, deadline) -> bool:
        """Reads the pipes until the launcher exits or the deadline; True if it timed out."""
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, out.add)
        sel.register(proc.stderr, selectors.EVENT_READ, err.add)
        sel.register(status_r, selectors.EVENT_READ, status.append)
        timed_out = False
        grace_end = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if grace_end is None and (now >= deadline or proc.poll() is not None):
                    if proc.poll() is None:
                        timed_out = True
                        _kill_tree(proc)
                    # Pipes may still be held by stray children (rlimits/uid modes): read
                    # what is buffered, briefly, then stop.
                    grace_end = time.monotonic() + 0.5
                if grace_end is not None and now >= grace_end:
                    break
                limit = (grace_end if grace_end is not None else deadline) - now
                for key, _ in sel.select(timeout=max(0.0, min(limit, 0.2))):
                    fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                    data = os.read(fd, 65536)
                    if not data:
                        sel.unregister(key.fileobj)
                    else:
                        key.data(data)
        finally:
            sel.close()
            if proc.poll() is None:
                _kill_tree(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        return timed_out

    # ---------------------------------------------------------------- many programs
    def run_many(self, programs: Sequence[str], workers: int | None = None, progress=None):
        """Results in input order; `workers` programs at a time (default: CPU count)."""
        workers = max(1, workers or os.cpu_count() or 1)
        done = [0]
        lock = threading.Lock()

        def one(p):
            r = self.run(p)
            if progress is not None:
                with lock:
                    done[0] += 1
                    progress(done[0], len(programs))
            return r

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, programs))


def _reap_uid(python: str, uid: int, gid: int) -> None:
    """Kills every process of the (throwaway) `uid`: kill(-1) sent as that uid."""
    reaper = "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
    subprocess.run(
        [python, "-I", "-S", "-c", reaper], user=uid, group=gid, extra_groups=[],
        cwd="/", env={}, timeout=30, check=False,
    )  # fmt: skip


def _hidden_interpreter(python: str) -> dict | None:
    """{"path": install prefix, "cover": its top ancestor others cannot search}, or None.

    E.g. /root/.pyenv/versions/3.11.7 under /root (mode 700): the namespace modes hide /root
    behind an empty tmpfs and mount the prefix back read-only (`_jail._expose_interpreter`).
    """
    prefix = os.path.dirname(os.path.dirname(python))
    path = "/"
    for part in prefix.strip("/").split("/"):
        path = os.path.join(path, part)
        if not os.stat(path).st_mode & 0o001:
            return {"path": prefix, "cover": path}
    return None


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: pgid == the launcher's pid
    except (ProcessLookupError, PermissionError):
        pass


_PROBE = "import os, sys\nsys.exit(0 if os.getcwd() == os.environ['HOME'] else 3)\n"


def probe(python: str | None = None) -> str:
    """The strongest mode that runs a trivial program here (cached per interpreter)."""
    return _probe(os.path.realpath(python or sys.executable))


@functools.cache
def _probe(python: str) -> str:
    candidates = ("namespaces", "uid", "rlimits") if os.geteuid() == 0 else ("userns", "rlimits")
    errors = []
    for mode in candidates:
        sb = Sandbox(Limits(timeout_s=30), mode=mode, python=python)
        result = sb.run(_PROBE)
        if result.passed:
            if sb.warning:
                log.warning("%s (why the stronger modes failed: %s)", sb.warning,
                            "; ".join(errors) or "-")  # fmt: skip
            return mode
        errors.append(f"{mode}: {result.cause}: {result.detail}")
    raise SandboxError(
        "No sandbox mode can run a trivial Python program here: "
        + " | ".join(errors)
        + f". Check that {python} is readable and executable by an unprivileged user "
        "(a virtualenv under /root is not), or pass another interpreter."
    )
