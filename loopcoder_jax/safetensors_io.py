"""The safetensors file format, read and written with numpy only (no torch, no pickle).

A safetensors file is: 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets
relative to the end of the header), then the raw little-endian tensor bytes. We parse the
header ourselves rather than through `safetensors.safe_open` so that every way a file can be
broken (truncated, corrupt header, overlapping offsets, unknown dtype) becomes an error that
names the file and tensor, and so that reads go straight into a caller-owned numpy buffer
(`preadv`): memory use is exactly the tensors the caller asked for.

Writing is split in two so a converter can stream: `plan_shards` fixes every tensor's file and
byte offset from shapes alone, `ShardWriter` writes the headers up front and then accepts the
tensors in any order (`pwrite` at the planned offset).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Refuse anything that would need pickle to read (torch.load executes arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit

DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file or index is malformed; the message names the file (and tensor)."""


def dtype_code(dtype) -> str:
    """numpy dtype -> safetensors dtype string ("BF16", "F32", ...)."""
    try:
        return _CODES[np.dtype(dtype)]
    except KeyError:
        raise SafetensorsError(f"dtype {np.dtype(dtype)} has no safetensors code") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype code, shape, absolute byte range."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and validates a safetensors header against the file's size.

    Returns:
      ({name: TensorInfo}, metadata). Raises `SafetensorsError` for a truncated file, a corrupt
      header, an unknown dtype, a byte range that disagrees with dtype x shape, or overlaps.
    """
    _check_regular(path)
    size = os.path.getsize(path)
    fix = "Re-download or re-export this file."
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: only {size} bytes, not a safetensors file. {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(
                f"{path}: corrupt or truncated header (header length field {n}, file size "
                f"{size}). {fix}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e}). {fix}") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            code, shape, (b, e) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            shape = tuple(int(s) for s in shape)
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(
                f"{path}: corrupt header entry for tensor {name!r}. {fix}"
            ) from None
        if code not in DTYPES:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has unknown dtype {code!r}; supported: {sorted(DTYPES)}."
            )
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize
        if b < 0 or e - b != want:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({code} {list(shape)}) needs {want} bytes but its "
                f"data_offsets are [{b}, {e}]: corrupt header. {fix}"
            )
        if data_start + e > size:
            raise SafetensorsError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + e} but the file "
                f"has {size} bytes (an interrupted download/copy?). {fix}"
            )
        infos[name] = TensorInfo(path, name, code, shape, data_start + b, data_start + e)
    ordered = sorted(infos.values(), key=lambda t: t.begin)
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.begin < prev.end:
            raise SafetensorsError(
                f"{path}: tensors {prev.name!r} and {cur.name!r} overlap: corrupt header. {fix}"
            )
    return infos, metadata


def _read_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise SafetensorsError(f"unexpected end of file at byte {offset + done}")
        done += got


def _write_from(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


class TensorReader:
    """Reads tensors of one or many safetensors files by name, keeping the files open."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos
        self._fds: dict[str, int] = {}

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor `name` as a numpy array (in its stored dtype), read into `out` if given."""
        info = self.infos[name]
        if out is None:
            out = np.empty(info.shape, info.np_dtype)
        elif out.shape != info.shape or out.dtype != info.np_dtype or not out.flags.c_contiguous:
            raise ValueError(f"buffer {out.shape} {out.dtype} does not fit {name} {info.shape}")
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        try:
            _read_into(fd, memoryview(out.reshape(-1).view(np.uint8)), info.begin)
        except SafetensorsError as e:
            raise SafetensorsError(f"{info.file}: tensor {name!r}: {e}") from None
        return out

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_regular(path: str) -> None:
    """Refuses anything but a regular file (a FIFO would block `open` forever; a directory,
    socket or device is no weight file), before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SafetensorsError(f"{path} does not exist.") from None
    if not stat.S_ISREG(mode):
        raise SafetensorsError(
            f"{path} is not a regular file (a directory, FIFO, socket or device); a checkpoint's "
            "config, index and weights must be plain files. Replace it with the real file."
        )


def _hf_cache_blobs(real_dir: str) -> str | None:
    """`<repo>/blobs` when `real_dir` is a Hugging Face cache snapshot `<repo>/snapshots/<rev>`,
    whose files are symlinks to `../../blobs/<hash>`."""
    parent = os.path.dirname(real_dir)
    if os.path.basename(parent) != "snapshots":
        return None
    return os.path.join(os.path.dirname(parent), "blobs")


def checked_member(directory: str, name: str) -> str:
    """`directory/name` for a file that belongs to the checkpoint: `name` is relative and, with
    symlinks resolved, stays inside `directory` (or its Hugging Face cache `blobs/`), and it is
    a regular file. Checked before anything is opened; an index is untrusted input."""
    where = f"{name!r} (named in {directory})"
    if os.path.isabs(name):
        raise SafetensorsError(
            f"{where} is an absolute path, outside the checkpoint directory; shard names must be "
            "files inside it (fix the index's weight_map)."
        )
    full = os.path.join(directory, name)
    real_dir = os.path.realpath(directory)
    real = os.path.realpath(full)
    roots = [real_dir] + [b for b in [_hf_cache_blobs(real_dir)] if b]
    if not any(os.path.commonpath([root, real]) == root for root in roots):
        raise SafetensorsError(
            f"{where} resolves to {real}, outside the checkpoint directory; refusing to read it. "
            "Copy the file into the directory (or fix the index's weight_map)."
        )
    if os.path.lexists(full):
        _check_regular(full)
    return full


def find_weight_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a HF checkpoint directory (or a single file).

    Returns:
      (absolute file paths, weight_map from the index or None for a single file).
    Raises:
      SafetensorsError when there are no safetensors, only pickle files, or the index names a
      shard that does not exist.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        _check_regular(path)
        if path.endswith(PICKLE_SUFFIXES):
            raise SafetensorsError(_pickle_message([path]))
        if path.endswith(".json"):
            path = os.path.dirname(os.path.abspath(path))
        else:
            return [os.path.abspath(path)], None
    if not os.path.isdir(path):
        raise SafetensorsError(f"{path} does not exist.")
    names = sorted(os.listdir(path))
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.lexists(index_path):
        checked_member(path, INDEX_FILE)
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index_path}: not a valid index ({e}).") from None
        files = sorted(set(weight_map.values()))
        if not all(isinstance(f, str) and f for f in files):
            raise SafetensorsError(f"{index_path}: weight_map values must be shard file names.")
        for f in files:
            checked_member(path, f)  # inside the directory, not a FIFO: before any open
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise SafetensorsError(
                f"{index_path} points to shard(s) {missing} that are not in {path}. Download the "
                "missing shards (or fix the index's weight_map)."
            )
        return [os.path.join(path, f) for f in files], weight_map
    if SINGLE_FILE in names:
        return [checked_member(path, SINGLE_FILE)], None
    st = [n for n in names if n.endswith(".safetensors")]
    if len(st) == 1:
        return [checked_member(path, st[0])], None
    if len(st) > 1:
        raise SafetensorsError(
            f"{path} has {len(st)} safetensors files but no {INDEX_FILE}; restore the index."
        )
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise SafetensorsError(_pickle_message([os.path.join(path, p) for p in pickles]))
    raise SafetensorsError(f"No safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) in {path}.")


def _pickle_message(files: Sequence[str]) -> str:
    return (
        f"Refusing pickle checkpoint file(s) {list(files)[:4]}: loading them would execute "
        "arbitrary code, so this tool never does. Convert them to safetensors first with the "
        "official tooling (e.g. transformers `model.save_pretrained(dir, "
        "safe_serialization=True)` in a trusted environment), then convert that directory."
    )


def open_checkpoint(path: str) -> TensorReader:
    """Validates every header (and the index) of a HF checkpoint; returns a reader over it."""
    files, weight_map = find_weight_files(path)
    infos: dict[str, TensorInfo] = {}
    for file in files:
        file_infos, _ = read_header(file)
        for name, info in file_infos.items():
            if name in infos:
                raise SafetensorsError(
                    f"tensor {name!r} is stored twice ({infos[name].file} and {file})."
                )
            infos[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            where = infos.get(name)
            if where is None or os.path.basename(where.file) != shard:
                raise SafetensorsError(
                    f"{INDEX_FILE} says tensor {name!r} is in {shard}, but "
                    + ("no shard has it" if where is None else f"it is in {where.file}")
                    + ". The index and shards come from different downloads; re-download."
                )
        stray = sorted(set(infos) - set(weight_map))
        if stray:
            raise SafetensorsError(
                f"tensors {stray[:4]} are in the shards but not in {INDEX_FILE}; re-download."
            )
    return TensorReader(infos)


def parse_size(size: int | str) -> int:
    """ "5GB" / "500MB" / "1.5GiB" / 123 -> bytes (decimal units for GB/MB, as HF does)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    if s.endswith("B"):
        s = s[:-1]
    return int(s)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: str  # file name inside the output directory
    offset: int  # absolute byte offset of the data in `file`

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_shards(
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]], max_shard_size: int | str
) -> tuple[list[PlannedTensor], dict[str, bytes]]:
    """Assigns tensors, in the given order, to shards of at most `max_shard_size` bytes.

    One shard -> `model.safetensors`; several -> `model-0000k-of-0000n.safetensors` (the HF
    names). A tensor larger than the limit gets a shard of its own.
    Returns:
      (planned tensors with file and absolute offset, {file name: header bytes}).
    """
    limit = parse_size(max_shard_size)
    groups: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    used = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if groups[-1] and used + nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append((name, tuple(shape), np.dtype(dtype)))
        used += nbytes
    n = len(groups)
    planned, headers = [], {}
    for k, group in enumerate(groups):
        fname = SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}  # transformers requires "format"
        pos = 0
        for name, shape, dtype in group:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {
                "dtype": dtype_code(dtype),
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes],
            }
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
        headers[fname] = struct.pack("<Q", len(raw)) + raw
        base = len(headers[fname])
        for name, shape, dtype in group:
            off = base + header[name]["data_offsets"][0]
            planned.append(PlannedTensor(name, shape, dtype, fname, off))
    return planned, headers


class ShardWriter:
    """Writes planned shards in `directory`; tensors may arrive in any order.

    Call `write(name, array)` once per planned tensor, then `finish()`, which checks that every
    tensor was written and writes `model.safetensors.index.json` when there are several shards.
    """

    def __init__(self, directory: str, planned: list[PlannedTensor], headers: dict[str, bytes]):
        self.directory = directory
        self.planned = {p.name: p for p in planned}
        self.headers = headers
        self.written: set[str] = set()
        self.bytes_written = 0
        self._fds = {}
        for fname, header in headers.items():
            fd = os.open(os.path.join(directory, fname), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            self._fds[fname] = fd
            _write_from(fd, memoryview(header), 0)

    def write(self, name: str, array: np.ndarray) -> None:
        p = self.planned[name]
        array = np.ascontiguousarray(array)
        if array.shape != p.shape or array.dtype != p.dtype:
            raise ValueError(
                f"{name}: got {array.shape} {array.dtype}, planned {p.shape} {p.dtype}"
            )
        _write_from(self._fds[p.file], memoryview(array.reshape(-1).view(np.uint8)), p.offset)
        self.written.add(name)
        self.bytes_written += p.nbytes

    def finish(self) -> list[str]:
        missing = sorted(set(self.planned) - self.written)
        if missing:
            raise ValueError(f"tensors never written: {missing[:8]}")
        for fd in self._fds.values():
            os.fsync(fd)
        self.close()
        if len(self.headers) > 1:
            index = {
                "metadata": {"total_size": sum(p.nbytes for p in self.planned.values())},
                "weight_map": {name: p.file for name, p in self.planned.items()},
            }
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return sorted(self.headers)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
