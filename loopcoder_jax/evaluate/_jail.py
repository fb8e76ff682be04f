"""The sandbox launcher: runs ONE untrusted Python program in a jail, then reports how it ended.

Started by `sandbox.Sandbox` as `python -I -S _jail.py CONFIG_JSON STATUS_FD`, with the program
on stdin and the sample's stdout/stderr as its own. It imports nothing from the project (it
runs before any isolation, so it must stay small enough to read in one sitting).

Modes (`CONFIG["mode"]`), strongest first; `sandbox.py` picks the first one that works here:
  namespaces (root): new mount, network, PID, IPC and UTS namespaces. In the new mount
      namespace every mount except /dev, /dev/pts and /proc is remounted read-only, a fresh
      size-limited tmpfs is mounted on /tmp (the program's cwd and HOME live in it), and a new
      /proc shows only the jail's processes. A minimal init (PID 1 of the new PID namespace)
      and the program (its child) run under a dedicated unprivileged uid/gid with
      no_new_privs and a parent-death SIGKILL: when the launcher dies (timeout) init dies, and
      with PID 1 gone the kernel kills every process left in the namespace.
  userns (not root, unprivileged user namespaces allowed): the same, inside a new user
      namespace that maps only the caller's own uid (no uid change is possible there).
  uid (root, namespaces refused, e.g. a locked-down container): dedicated uid, rlimits and a
      private temp directory; the network and world-writable paths (/tmp, /dev/shm) stay
      reachable. Init kills the uid's leftovers (kill(-1) as that uid) when the program ends.
  rlimits (neither): rlimits and a private temp directory only; the program can write
      wherever the user can. Only for code you would run anyway.
Every mode applies the rlimits (CPU seconds, address space, processes, file size, open
files, no core dumps) and runs the program with a minimal environment and stdin = /dev/null.

Process tree: launcher (as the caller) -> jail init (PID 1 of the new PID namespace, the jail's
uid) -> the program. Status lines (JSON) on STATUS_FD, which the program never inherits:
  {"setup_error": "what failed"}                        the jail could not be set up
  {"program_exit": code} | {"program_signal": n}        how the program ended (from init)
  {"exit": code} | {"signal": n}                        how init ended (from the launcher)
"""

import ctypes
import errno
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_MOVE, MS_REC, MS_PRIVATE, MS_RELATIME = 8192, 16384, 1 << 18, 1 << 21
# statvfs f_flag bit -> the mount flag that keeps it (remounting must keep "locked" flags)
_KEEP_FLAGS = ((2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME),
               (2048, MS_NODIRATIME), (4096, MS_RELATIME))  # fmt: skip

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SETUP_FAILED = 125  # the jailed child's exit code when it could not set the jail up

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    ret = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount {target} ({fstype or 'remount'})")


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            field = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as \ooo octal
            points.append(field.encode().decode("unicode_escape").encode("latin-1").decode())
    return sorted(set(points))


def _make_filesystem_read_only() -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do propagates to the host
    for point in _mount_points():
        if point in ("/dev", "/dev/pts") or point == "/proc" or point.startswith("/proc/"):
            continue  # /dev: root-owned device nodes; /proc: replaced below
        if not os.path.exists(point):
            continue  # shadowed by a later mount on a parent path: unreachable anyway
        _remount_read_only(point)


def _remount_read_only(point: str) -> None:
    keep = os.statvfs(point).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | sum(ms for st, ms in _KEEP_FLAGS if keep & st)
    _mount(None, point, None, flags)


def _expose_interpreter(path: str, cover: str) -> None:
    """Makes the interpreter tree `path` visible to the jail's uid although its ancestor
    `cover` is not searchable by others (e.g. a pyenv under /root, mode 700).

    `cover` is hidden behind an empty tmpfs and `path` alone is bind-mounted back, read-only,
    at the same place (the interpreter finds its libraries by its own path): the program sees
    the interpreter and nothing else of `cover` (the user's home, typically).
    """
    stage = "/tmp/.interpreter"
    os.mkdir(stage, 0o755)
    _mount(path, stage, None, MS_BIND | MS_REC)
    _mount("tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.makedirs(path, 0o755, exist_ok=True)
    _mount(stage, path, None, MS_MOVE)
    _remount_read_only(path)
    _remount_read_only(cover)
    os.rmdir(stage)


def _write_id_maps(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _set_limits(cfg: dict) -> None:
    cpu = int(cfg["cpu_seconds"])
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard
        resource.RLIMIT_AS: (cfg["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (cfg["file_size_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (cfg["open_files"],) * 2,
        resource.RLIMIT_NPROC: (cfg["nproc"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        resource.setrlimit(which, (soft, hard))


def _jailed_child(cfg: dict, program: bytes, status_fd: int) -> None:
    """Runs in the forked child (PID 1 of the new PID namespace in the namespace modes)."""
    mode, uid, gid = cfg["mode"], cfg["uid"], cfg["gid"]
    workdir = cfg["workdir"]
    if mode in ("namespaces", "userns"):
        _make_filesystem_read_only()
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={cfg['tmpfs_bytes']},mode=1777")  # fmt: skip
        os.mkdir(workdir, 0o700)
        if cfg.get("expose"):
            _expose_interpreter(**cfg["expose"])
        try:  # only this PID namespace's processes; refused in some user namespaces
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except SetupError:
            if mode == "namespaces":
                raise
        _libc.sethostname(b"sandbox", 7)
    prog = os.path.join(workdir, "program.py")
    with open(prog, "wb") as f:
        f.write(program)
    os.chmod(prog, 0o644)
    if uid is not None and os.geteuid() == 0:
        os.chown(workdir, uid, gid)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _set_limits(cfg)
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    # After the uid change (which clears it): die with the launcher, and never gain
    # privileges through setuid binaries.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    if os.getppid() != cfg["launcher_pid"] and mode not in ("namespaces", "userns"):
        os._exit(SETUP_FAILED)  # the launcher died before PDEATHSIG was armed
    os.chdir(workdir)
    # This process stays as a minimal init (PID 1 of the namespace): the program runs as its
    # child, so signals behave as usual for it (PID 1 ignores signals it has no handler for),
    # and its orphans are reaped here.
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(DUMPABLE)")
    pid = os.fork()
    if pid == 0:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        os.execve(cfg["python"], [cfg["python"], "-I", prog], cfg["env"])
    status = _wait_for(pid)
    if os.WIFSIGNALED(status):
        report(status_fd, {"program_signal": os.WTERMSIG(status)})
    else:
        report(status_fd, {"program_exit": os.WEXITSTATUS(status)})
    if uid is not None and os.getuid() == uid:
        # The uid is this program's alone: kill(-1) reaches exactly what it left running
        # (double-forked daemons included). In the namespace modes PID 1's exit also does.
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


def _wait_for(pid: int) -> int:
    """Waits for `pid`, reaping any other child (orphans reparented here) meanwhile."""
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        if got == pid:
            return status


def report(fd: int, obj) -> None:
    os.write(fd, (json.dumps(obj) + "\n").encode())


def main() -> int:
    cfg = json.loads(sys.argv[1])
    status_fd = int(sys.argv[2])
    os.set_inheritable(status_fd, False)

    program = sys.stdin.buffer.read()
    cfg["launcher_pid"] = os.getpid()
    uid, gid = os.getuid(), os.getgid()  # before unshare: a new user namespace hides them
    try:
        if cfg["mode"] == "namespaces":
            _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
                                 | CLONE_NEWUTS), "unshare")  # fmt: skip
        elif cfg["mode"] == "userns":
            _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
                                 | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")  # fmt: skip
            _write_id_maps(uid, gid)
    except (SetupError, OSError) as e:
        report(status_fd, {"setup_error": str(e)})
        return SETUP_FAILED
    pid = os.fork()
    if pid == 0:
        try:
            _jailed_child(cfg, program, status_fd)
        except BaseException as e:  # noqa: BLE001 - anything here is a setup failure
            try:
                report(status_fd, {"setup_error": f"{type(e).__name__}: {e}"})
            finally:
                os._exit(SETUP_FAILED)
    # The launcher only waits; the program cannot signal it (other uid) in the uid modes.
    status = _wait_for(pid)
    if os.WIFSIGNALED(status):
        report(status_fd, {"signal": os.WTERMSIG(status)})
    else:
        report(status_fd, {"exit": os.WEXITSTATUS(status)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
