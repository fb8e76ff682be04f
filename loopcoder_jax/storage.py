"""Local or object-store (`gs://`) paths: the file operations checkpoints, run dirs and the
converter need, and how each kind of path commits a write.

Local paths keep the POSIX protocol: write a temporary name, fsync, rename into place.
Object stores have no atomic rename (gcsfuse renames by copy + delete, not atomically), and
a multi-host pod shares no local disk, so there:
  - one object is written in one request and appears whole or not at all, so small files
    (JSON, the tokenizer) are written straight to their final name;
  - a directory of many objects is complete once its commit file exists. That is Orbax's
    own rule for object stores (`CommitFileTemporaryPath`: `commit_success.txt`, written
    last); `mark_committed` / `is_committed` apply it to the directories we assemble, and
    Orbax applies it to its own step directories.

Remote paths go through fsspec (gcsfs for gs://, the backend `etils.epath` uses when
TensorFlow is absent) with the listing cache off: Orbax writes array data through
tensorstore, behind gcsfs's back, and a cached listing would hide those objects.

Pointing everything at a GCS emulator (tests): STORAGE_EMULATOR_HOST=http://HOST:PORT for
gcsfs and google-cloud-storage, TENSORSTORE_GCS_HTTP_URL=http://HOST:PORT for tensorstore
(Orbax's array I/O), and GOOGLE_AUTH_TOKEN_FOR_TESTING=<anything> so tensorstore does not
look for credentials. See docs/training.md ("Runs on Cloud Storage").
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid

# Orbax's name (orbax.checkpoint.path.atomicity.COMMIT_SUCCESS_FILE; a test checks they agree),
# spelled here so this module does not import Orbax (and with it jax).
COMMIT_FILE = "commit_success.txt"

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
SUPPORTED_SCHEMES = ("gs",)


class RemoteStorageError(ValueError):
    """A remote path cannot be used (no backend installed, or an unsupported operation)."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as `gs://bucket/dir` (`file://` counts as local)."""
    m = _SCHEME.match(os.fspath(path))
    return bool(m) and m.group(1).lower() != "file"


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path, or the URL without a trailing slash."""
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def parent(path: str | os.PathLike) -> str:
    path = resolve(path)
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def _fs(path: str):
    """(fsspec filesystem, path as that filesystem names it) for a remote path."""
    import fsspec

    scheme = _SCHEME.match(path).group(1).lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise RemoteStorageError(
            f"{path}: {scheme}:// is not supported; use a local path or gs:// (the object store "
            "Orbax commits with a commit file rather than a rename)."
        )
    try:
        return fsspec.core.url_to_fs(path, use_listings_cache=False)
    except ImportError as e:
        raise RemoteStorageError(
            f"{path}: no filesystem backend for this URL ({e}). For gs:// install the `gcs` "
            "extra: pip install 'loopcoder-jax[gcs]' (gcsfs)."
        ) from None


def exists(path: str | os.PathLike) -> bool:
    """A file, or a directory (on an object store: any object under the prefix)."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def isfile(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.isfile(path)
    fs, p = _fs(path)
    return fs.isfile(p)


def listdir(path: str | os.PathLike) -> list[str]:
    """Entry names (not paths) directly under `path`."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.listdir(path)
    fs, p = _fs(path)
    return [posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False)]


def makedirs(path: str | os.PathLike) -> None:
    """Local: `os.makedirs(exist_ok=True)`. Object stores have no directories: a no-op."""
    path = os.fspath(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def rmtree(path: str | os.PathLike) -> None:
    """Removes a directory tree (or file) if it exists."""
    path = os.fspath(path)
    if not is_remote(path):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
        return
    fs, p = _fs(path)
    marker = posixpath.join(p, COMMIT_FILE)
    if fs.exists(marker):  # first: a half-deleted directory must not look committed
        fs.rm(marker)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    path = os.fspath(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return fs.cat_file(p)


def read_json(path: str | os.PathLike):
    return json.loads(read_bytes(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Readers never see a partial file: local temp + fsync + rename; remote one object."""
    path = os.fspath(path)
    if is_remote(path):
        fs, p = _fs(path)
        try:
            fs.pipe_file(p, data)
        except Exception as e:  # gcsfs: FileNotFoundError (no bucket), HttpError (403), ...
            raise RemoteStorageError(
                f"Cannot write {path} ({type(e).__name__}: {e}). Check that the bucket exists "
                "and that these credentials may write to it."
            ) from e
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    """JSON (indent 2, sorted keys) written as `write_bytes` does."""
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file between any two kinds of path, never leaving a partial `dst`."""
    write_bytes(dst, read_bytes(src))


@contextlib.contextmanager
def local_copy(path: str | os.PathLike):
    """Yields a local path holding the file at `path` (a temporary copy for a remote one),
    for readers that need a real file (SentencePiece)."""
    path = os.fspath(path)
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="loopcoder-") as d:
        local = os.path.join(d, posixpath.basename(path))
        with open(local, "wb") as f:
            f.write(read_bytes(path))
        yield local


def mark_committed(directory: str | os.PathLike) -> None:
    """Writes the commit file: call last, once everything else in `directory` is written."""
    write_bytes(join(directory, COMMIT_FILE), f"Commit was successful to {directory}".encode())


def is_committed(directory: str | os.PathLike) -> bool:
    return exists(join(directory, COMMIT_FILE))
