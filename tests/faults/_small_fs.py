"""A real filesystem that fills up: a small tmpfs, or (without mount rights) RLIMIT_FSIZE.

tmpfs gives the real ENOSPC ("No space left on device"). Where `mount` is not permitted (CI
not running as root), the per-file size limit RLIMIT_FSIZE makes the same writes fail with
EFBIG ("File too large"), through the same code paths; SIGXFSZ is ignored so the write
fails instead of killing the process. Either way nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess


@contextlib.contextmanager
def small_filesystem(path, size_bytes: int):
    """Yields (directory, kind) where writes beyond about `size_bytes` fail."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
    ).returncode == 0  # fmt: skip
    if mounted:
        try:
            yield str(path), "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(path)], check=True)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, hard))
    try:
        yield str(path), "rlimit"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
