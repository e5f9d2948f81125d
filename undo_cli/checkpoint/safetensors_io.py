"""Streaming safetensors I/O: a lazy tensor reader and a header-first shard writer.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (padded with
spaces so the data starts 8-byte aligned) mapping each tensor name to its dtype, shape and
`data_offsets` [begin, end) relative to the data section, then the raw little-endian data.

`CheckpointReader` parses only the headers of a checkpoint's files (one `model.safetensors`,
or the shards named by `model.safetensors.index.json`) and reads a tensor, or a range of its
bytes, when asked: copied with positional file reads (`read_bytes`), or viewed in place in
the file mapped into memory (`view_bytes`, released page by page with `release`), so
resident memory stays at what is actually being processed.

`SafetensorsWriter` writes the header of a file up front (shapes and dtypes are known before
any data) and then takes tensor bytes in order, in pieces of any size; `write_index` adds the
index of a sharded checkpoint. The output loads with `safetensors.safe_open` and
`transformers`' `from_pretrained`.

Bytes travel as numpy uint8 arrays: the module needs no torch (so `undo perturb` starts in a
fraction of a second); `CheckpointReader.read`, `save_tensors` and `dtype_name` accept or
return torch tensors and import torch only when called.

Corrupt input (bad header length, bad JSON, inconsistent entries, truncated data) raises
`DataError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from undo_cli.errors import DataError, UsageError
from undo_cli.options.base import parse_size  # noqa: F401 - re-exported

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces

# safetensors dtype name -> (bytes per element, name of the torch dtype).
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "C64": (8, "complex64"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
}
# Floats the noise step changes (F8_E8M0, an exponent-only scale format, is copied as is).
FLOAT_DTYPES = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of safetensors dtype `name` (None where torch has none); imports
    torch."""
    import torch

    return getattr(torch, DTYPES[name][1], None) if name in DTYPES else None


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (`torch.float32` -> "F32")."""
    wanted = str(dtype).removeprefix("torch.")
    for name, (_, torch_name) in DTYPES.items():
        if torch_name == wanted:
            return name
    raise UsageError(f"dtype {dtype} cannot be stored in safetensors")


def natural_key(name: str) -> tuple:
    """Sort key putting `layers.2` before `layers.10`."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs to know about a tensor before its data: name, dtype, shape."""

    name: str
    dtype: str  # safetensors dtype name ("F32", "BF16", ...)
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0] if self.dtype in DTYPES else 1

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return torch_dtype(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class TensorEntry(TensorSpec):
    """A tensor stored in a file: its spec plus where its bytes lie (absolute file offset)."""

    path: Path = Path()
    offset: int = 0

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape, self.nbytes)


@dataclass
class SafetensorsFile:
    """The parsed header of one .safetensors file."""

    path: Path
    metadata: dict[str, str]
    entries: dict[str, TensorEntry]  # in data order
    data_start: int
    size: int


def read_header(path: str | Path) -> SafetensorsFile:
    """Parse and check the header of a .safetensors file (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise DataError(f"not a safetensors file: only {size} bytes long", path)
            (n,) = struct.unpack("<Q", f.read(8))
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise DataError(f"corrupt safetensors file: header length {n} does not fit a "
                                f"file of {size} bytes", path)
            raw = f.read(n)
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"corrupt safetensors file: header is not valid JSON ({e})", path) from e
    if not isinstance(header, dict):
        raise DataError("corrupt safetensors file: header is not a JSON object", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise DataError("corrupt safetensors file: __metadata__ is not an object", path)
    data_start = 8 + n
    entries: list[TensorEntry] = []
    for name, value in header.items():
        entries.append(_entry(path, name, value, data_start, size))
    entries.sort(key=lambda e: (e.offset, e.offset + e.nbytes))
    for a, b in zip(entries, entries[1:]):
        if b.offset < a.offset + a.nbytes:
            raise DataError(f"corrupt safetensors file: tensors {a.name!r} and {b.name!r} "
                            "overlap", path)
    return SafetensorsFile(path=path, metadata={str(k): str(v) for k, v in metadata.items()},
                           entries={e.name: e for e in entries}, data_start=data_start,
                           size=size)


def _entry(path: Path, name: str, value: object, data_start: int, size: int) -> TensorEntry:
    def bad(why: str) -> DataError:
        return DataError(f"corrupt safetensors file: tensor {name!r} {why}", path)

    if not isinstance(value, dict):
        raise bad("has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad("has no dtype")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    spec = TensorSpec(name, dtype, tuple(shape), end - begin)
    if dtype in DTYPES and spec.numel * spec.itemsize != end - begin:
        raise bad(f"of shape {list(shape)} and dtype {dtype} should take "
                  f"{spec.numel * spec.itemsize} bytes, its data_offsets give {end - begin}")
    if data_start + end > size:
        raise DataError(f"truncated safetensors file: tensor {name!r} ends at byte "
                        f"{data_start + end} but the file has {size} bytes", path)
    return TensorEntry(name, dtype, tuple(shape), end - begin, path=path,
                       offset=data_start + begin)


def index_weight_file(directory: Path, name: object, index_file: Path) -> Path:
    """The weight file `name` of an index, inside `directory`: a relative path (sharded
    checkpoints may keep shards in subdirectories); `DataError` for one that is not a string,
    is absolute or climbs out with `..`."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"names a weight file that is not a file name: {name!r}", index_file)
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise DataError(f"names a weight file outside the checkpoint directory: {name!r}",
                        index_file)
    return directory / relative


def read_index(index_file: Path) -> dict:
    """A weight index (`*.index.json`): a JSON object whose `weight_map` maps tensor names to
    file names; `DataError` naming the file otherwise."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not a valid weight index: not JSON ({e})", index_file) from e
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", index_file) from e
    if not isinstance(index, dict):
        raise DataError(f"not a valid weight index: a JSON {type(index).__name__}, not an "
                        "object", index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DataError("not a valid weight index: 'weight_map' is missing or not an object "
                        "of tensor names", index_file)
    if not isinstance(index.get("metadata", {}) or {}, dict):
        raise DataError("not a valid weight index: 'metadata' is not an object", index_file)
    return index


def checkpoint_weight_files(path: str | Path) -> tuple[list[Path], dict | None]:
    """The .safetensors files of a checkpoint directory (or a single file) and its index.

    Files named by an index are kept by their relative path (`a/model.safetensors` and
    `b/model.safetensors` are two files)."""
    path = Path(path)
    if path.is_file():
        return [path], None
    index_file = path / INDEX_NAME
    if index_file.is_file():
        index = read_index(index_file)
        files = sorted({index_weight_file(path, f, index_file)
                        for f in index["weight_map"].values()})
        missing = [f.relative_to(path).as_posix() for f in files if not f.is_file()]
        if missing:
            raise DataError(f"names weight files that do not exist: {missing}", index_file)
        return files, index
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{path} holds no safetensors weights")
    return files, None


class CheckpointReader:
    """Read-on-demand access to the tensors of a safetensors checkpoint.

    `path` is a checkpoint directory (single file or sharded with an index) or one
    .safetensors file. Only headers are read on construction; `read` and `read_range` fetch
    bytes with positional reads. Safe to use from several threads at once.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        file_paths, index = checkpoint_weight_files(self.path)
        self.index_metadata: dict = dict((index or {}).get("metadata") or {})
        self.files: list[SafetensorsFile] = [read_header(p) for p in file_paths]
        self.entries: dict[str, TensorEntry] = {}
        for f in self.files:
            for name, entry in f.entries.items():
                if name in self.entries:
                    raise DataError(f"tensor {name!r} is stored twice (also in "
                                    f"{self.relative(self.entries[name].path)})", f.path)
                self.entries[name] = entry
        if index is not None:
            for name, file in index["weight_map"].items():
                entry = self.entries.get(name)
                if entry is None or entry.path != self.path / str(file):
                    raise DataError(f"the index places tensor {name!r} in {file}, which does "
                                    "not hold it", self.path / INDEX_NAME)
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, tuple[mmap.mmap, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> CheckpointReader:
        return self

    def relative(self, file: Path) -> str:
        """`file`'s path relative to the checkpoint directory (its name for a single file)."""
        if self.path.is_dir():
            return file.relative_to(self.path).as_posix()
        return file.name

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        maps, self._maps = self._maps, {}
        for m, _ in maps.values():
            with contextlib.suppress(BufferError):  # views still in use: freed with them
                m.close()
        for fd in fds.values():
            os.close(fd)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds.setdefault(path, os.open(path, os.O_RDONLY))
        return fd

    def read_bytes(self, name: str, start: int = 0, nbytes: int | None = None, *,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Bytes [start, start + nbytes) of tensor `name`'s data, as a uint8 array (read into
        the front of `out`, a uint8 array, when given)."""
        entry = self.entries[name]
        if nbytes is None:
            nbytes = entry.nbytes - start
        if start < 0 or nbytes < 0 or start + nbytes > entry.nbytes:
            raise ValueError(f"byte range [{start}, {start + nbytes}) outside tensor {name!r}")
        return pread_exact(self._fd(entry.path), entry.offset + start, nbytes, entry.path,
                           out=out)

    def _mapping(self, path: Path) -> tuple[mmap.mmap, np.ndarray]:
        with self._lock:
            found = self._maps.get(path)
            if found is None:
                m = mmap.mmap(self._fd(path), 0, prot=mmap.PROT_READ)
                found = self._maps[path] = (m, np.frombuffer(m, dtype=np.uint8))
            return found

    def view_bytes(self, name: str, start: int, nbytes: int) -> np.ndarray:
        """Bytes [start, start + nbytes) of tensor `name`'s data without copying: a read-only
        view of the file mapped into memory. Only the pages touched become resident; hand
        them back with `release` once used, which keeps resident memory bounded."""
        entry = self.entries[name]
        if start < 0 or nbytes < 0 or start + nbytes > entry.nbytes:
            raise ValueError(f"byte range [{start}, {start + nbytes}) outside tensor {name!r}")
        _, data = self._mapping(entry.path)
        return data[entry.offset + start:entry.offset + start + nbytes]

    def release(self, name: str, start: int, nbytes: int) -> None:
        """Drop the pages of a `view_bytes` range from this process's resident memory (they
        stay in the page cache; a later access reads them again)."""
        entry = self.entries[name]
        m = self._maps.get(entry.path)
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        first = -(-(entry.offset + start) // page) * page  # whole pages inside the range
        last = (entry.offset + start + nbytes) // page * page
        if last > first:
            m[0].madvise(mmap.MADV_DONTNEED, first, last - first)

    def read_range(self, name: str, start: int, count: int, *,
                   out: np.ndarray | None = None) -> np.ndarray:
        """The bytes of elements [start, start + count) of tensor `name` (flattened), as a
        uint8 array (read into the front of `out` when given)."""
        size = self.entries[name].itemsize
        return self.read_bytes(name, start * size, count * size, out=out)

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor `name` as a torch tensor, with its shape and dtype."""
        import torch

        entry = self.entries[name]
        dtype = entry.torch_dtype
        if dtype is None:
            raise UsageError(f"tensor {name!r} has dtype {entry.dtype}, which torch cannot read")
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.from_numpy(self.read_bytes(name)).view(dtype).reshape(entry.shape)


def pread_exact(fd: int, offset: int, nbytes: int, path: Path | None = None, *,
                out: np.ndarray | None = None) -> np.ndarray:
    """Read exactly `nbytes` at `offset` of `fd` into a uint8 array: the front of `out` when
    given, else a new one. Plain reads, no mmap."""
    if out is None:
        buf = np.empty(nbytes, dtype=np.uint8)
    else:
        if out.dtype != np.uint8 or out.size < nbytes:
            raise ValueError("out must be a uint8 array of at least nbytes elements")
        buf = out[:nbytes]
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise DataError(f"truncated: expected {nbytes} bytes at offset {offset}, "
                            f"got {got}", path)
        got += n
    return buf


def as_bytes(data: np.ndarray | torch.Tensor | bytes | bytearray | memoryview) -> memoryview:
    """A byte view of a (contiguous) array, tensor or bytes-like object, without copying."""
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    if type(data).__module__.startswith("torch"):  # a torch tensor (torch is imported)
        import torch

        flat = data.detach().reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if flat.device.type != "cpu":
            flat = flat.cpu()
        return memoryview(flat.view(torch.uint8).numpy()).cast("B")
    return memoryview(data).cast("B")


def _header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def file_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order tensors take inside one file: by element size (largest first, so every
    tensor starts aligned to its element size), then by name, as safetensors itself writes
    them (a file written by `save_pretrained` keeps its layout)."""
    return sorted(specs, key=lambda s: (-s.itemsize, s.name))


class SafetensorsWriter:
    """Write one .safetensors file: the header at once, then the tensors' bytes in order.

    `specs` fixes the order (use `file_order`). Call `write(name, data)` with the data of the
    current tensor, in as many pieces as convenient; tensors must come in `specs` order.
    `close()` checks that every byte arrived.
    """

    def __init__(self, path: str | Path, specs: Sequence[TensorSpec],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        header = _header_bytes(self.specs, metadata)
        self.offsets: dict[str, int] = {}
        offset = len(header)
        for spec in self.specs:
            self.offsets[spec.name] = offset
            offset += spec.nbytes
        self.size = offset
        self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self._write_all(memoryview(header))
        self._index = 0
        self._remaining = self.specs[0].nbytes if self.specs else 0

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            n = self._file.write(view)
            view = view[n:]

    def _skip_empty(self) -> None:
        while self._remaining == 0 and self._index < len(self.specs):
            self._index += 1
            if self._index < len(self.specs):
                self._remaining = self.specs[self._index].nbytes

    @property
    def current(self) -> str | None:
        """The name of the tensor whose bytes are expected next (None when complete)."""
        self._skip_empty()
        return self.specs[self._index].name if self._index < len(self.specs) else None

    def write(self, name: str,
              data: np.ndarray | torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Append bytes of tensor `name` (which must be the current one)."""
        view = as_bytes(data)
        if view.nbytes == 0:
            return
        current = self.current
        if name != current:
            raise ValueError(f"{self.path.name}: got data for {name!r}, expected {current!r}")
        if view.nbytes > self._remaining:
            raise ValueError(f"{self.path.name}: too many bytes for tensor {name!r}")
        self._write_all(view)
        self._remaining -= view.nbytes

    def abort(self) -> None:
        """Close the file without checking that it is complete (on failure)."""
        self._file.close()

    def close(self) -> None:
        if self._file.closed:
            return
        missing = self.current
        self._file.close()
        if missing is not None:
            raise ValueError(f"{self.path.name}: closed before all of tensor {missing!r} "
                             "was written")


def shard_file_names(count: int) -> list[str]:
    """`model.safetensors` for one file, else `model-00001-of-0000N.safetensors`, ..."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def split_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Fill shards of at most `max_shard_size` tensor bytes, in the given order (a tensor
    larger than the limit gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_index(directory: str | Path, shards: Sequence[tuple[str, Sequence[TensorSpec]]],
                metadata: dict | None = None) -> Path:
    """Write `model.safetensors.index.json` for `shards` ([(file name, specs), ...])."""
    weight_map = {spec.name: file for file, specs in shards for spec in specs}
    meta = dict(metadata or {})
    meta["total_size"] = sum(spec.nbytes for _, specs in shards for spec in specs)
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    out = Path(directory) / INDEX_NAME
    out.write_text(json.dumps(index, indent=2) + "\n")
    return out


def save_tensors(tensors: dict[str, torch.Tensor], directory: str | Path, *,
                 max_shard_size: int | str | None = None,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write in-memory `tensors` as a (possibly sharded) safetensors checkpoint; returns the
    file names. Tensors are laid out in natural name order."""
    specs = {
        name: TensorSpec(name, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size())
        for name, t in tensors.items()
    }
    ordered = sorted(specs.values(), key=lambda s: natural_key(s.name))
    groups = (split_shards(ordered, parse_size(max_shard_size)) if max_shard_size
              else [ordered])
    names = shard_file_names(len(groups))
    meta = {"format": "pt", **(metadata or {})}
    for file, group in zip(names, groups):
        with SafetensorsWriter(Path(directory) / file, file_order(group), meta) as w:
            for spec in w.specs:
                w.write(spec.name, tensors[spec.name])
    if len(groups) > 1:
        write_index(directory, list(zip(names, groups)))
    return names
