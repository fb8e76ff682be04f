"""One writer per run dir: RUN/.lock names the host and PID of the process training into it.

Two `train.py` on one run dir would interleave checkpoints and truncate each other's
metrics. The lock is a file created with O_EXCL (atomic on local filesystems and NFS v3+),
holding JSON {host, pid, started}; it is not an OS advisory lock, because those do not
cross hosts on shared filesystems. In a multi-process job only process 0 takes it (all the
processes of one job are one writer).

A lock left by a process that died (kill -9, OOM, a crashed VM) cannot remove itself. On the
same host the PID tells whether its holder is alive, so a dead holder's lock is taken over
with a note. A lock from another host cannot be checked from here: the error says which host
and PID hold it and how to remove it once that process is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid

LOCK_FILE = ".lock"


class RunDirLockedError(RuntimeError):
    """Another live process holds the run dir's lock; the message names it and the fix."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # half-written by a holder killed mid-write: treat as stale


class RunDirLock:
    """`with RunDirLock(run_dir, log=print): ...` holds RUN/.lock for the block.

    Raises RunDirLockedError if another live process holds it. `notes` records a takeover.
    """

    def __init__(self, run_dir: str, *, log=print):
        self.path = os.path.join(os.path.abspath(run_dir), LOCK_FILE)
        self.log = log
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.held = False

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):  # create; or take over a dead holder's lock, then create
            if self._create():
                self.held = True
                return
            holder = _read(self.path)
            if not self._stale(holder):
                raise RunDirLockedError(self._busy_message(holder))
            if self._take_over(holder):
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "unknown"
                self.log(f"[train] note: took over the lock of a dead process ({who}): {self.path}")
        raise RunDirLockedError(
            f"Could not lock {self.path}: another process keeps creating it. Is a second "
            "train.py starting on this run dir?"
        )

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.mine, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _stale(self, holder: dict) -> bool:
        if not holder:
            return True
        same_host = holder.get("host") == self.mine["host"]
        return same_host and not _alive(int(holder.get("pid", -1)))

    def _take_over(self, holder: dict) -> bool:
        # Rename, not unlink: of two processes taking over the same stale lock, only one
        # rename succeeds, and neither can remove a lock the other has just created.
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if _read(aside) != holder:  # renamed a fresh lock created in between: put it back
            with contextlib.suppress(OSError):
                os.rename(aside, self.path)
            return False
        os.remove(aside)
        return True

    def _busy_message(self, holder: dict) -> str:
        host, pid = holder.get("host"), holder.get("pid")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        where = "this host" if host == self.mine["host"] else f"host {host}"
        return (
            f"{os.path.dirname(self.path)} is in use by another training process (pid {pid} "
            f"on {where}, since {since}). Wait for it to finish, stop it, or use another "
            f"--run-dir. If that process is gone (e.g. its host was lost), delete {self.path}."
        )

    def release(self) -> None:
        if self.held and _read(self.path) == self.mine:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
