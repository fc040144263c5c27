"""safetensors files, the one format cifarctl stores tensors in (weights, checkpoints, dataset
caches): written atomically, read with every failure turned into one exception type. Nothing in
them is ever unpickled."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarctl import fsutil


class TensorFileError(Exception):
    """A file that safetensors cannot read: missing, truncated or garbled; the message says which."""


def save(path: Path | str, tensors: dict[str, Any], metadata: dict[str, str],
         check: Callable[[Path], None] | None = None) -> None:
    """Write torch tensors or numpy arrays (not mixed) and string metadata to `path` atomically.

    Torch tensors are copied to contiguous CPU memory first (which also breaks shared storage,
    which safetensors refuses). `check(tmp)` may read the written file back and raise before it
    replaces the old one.
    """
    if any(hasattr(v, "detach") for v in tensors.values()):
        from safetensors.torch import save_file

        data = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    else:
        import numpy as np
        from safetensors.numpy import save_file

        data = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with fsutil.atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=metadata)
        if check is not None:
            check(tmp)


def load(path: Path | str, framework: str = "pt") -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, as torch tensors ("pt") or numpy arrays ("np")."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise TensorFileError("missing")
    try:
        with safe_open(str(path), framework=framework) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises several types for truncated or garbled files
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise TensorFileError(f"unreadable: {first}") from err


def read_metadata(path: Path | str) -> dict[str, str]:
    """Only the metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # as in `load`
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise TensorFileError(f"unreadable: {first}") from err


# safetensors dtype names <-> numpy dtypes, for the files cifarctl maps and streams itself.
_DTYPES = {"U8": "uint8", "I64": "int64", "F32": "float32", "F16": "float16", "I32": "int32"}
_MAX_HEADER = 100 << 20  # a header of more than 100 MB is not one cifarctl wrote
_COPY_CHUNK = 8 << 20  # bytes per read while checksumming or copying


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes lie in a safetensors file (absolute byte offsets)."""

    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path | str) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors' places and the metadata of a safetensors file, checked against its size;
    nothing else is read. Raises TensorFileError."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise TensorFileError("unreadable: header size out of range")
            header = json.loads(f.read(n))
    except FileNotFoundError as err:
        raise TensorFileError("missing") from err
    except (OSError, ValueError) as err:
        raise TensorFileError(f"unreadable: {str(err)[:120]}") from err
    if not isinstance(header, dict):
        raise TensorFileError("unreadable: the header is not an object")
    meta = header.pop("__metadata__", None) or {}
    entries, base = {}, 8 + n
    try:
        for name, info in header.items():
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (base + int(o) for o in info["data_offsets"])
            if min(shape, default=0) < 0 or not base <= start <= end <= size or \
                    end - start != math.prod(shape) * np.dtype(dtype).itemsize:
                raise ValueError(f"{name} lies outside the file or has the wrong length")
            entries[name] = Entry(dtype, shape, start, end)
    except (KeyError, TypeError, ValueError) as err:
        raise TensorFileError(f"unreadable: {str(err)[:120]}") from err
    return entries, {str(k): str(v) for k, v in meta.items()}


class Pages:
    """The memory map under a file's tensors, whose pages a long reader hands back as it goes."""

    def __init__(self, mm: mmap.mmap | None) -> None:
        self._mm = mm

    def release(self) -> None:
        """Drop this process's resident pages of the map (MADV_DONTNEED where the system has it).
        They stay in the page cache, so the next read maps them again at the cost of a minor
        fault; the map is private and never written, so nothing is lost. Without this, reading
        random batches leaves the whole file resident in the reader after an epoch."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if self._mm is not None and advice is not None and not self._mm.closed:
            self._mm.madvise(advice)


def load_mapped(path: Path | str, framework: str = "pt") -> tuple[dict[str, Any], dict[str, str], Pages]:
    """(tensors, metadata, pages) with the tensors backed by a memory map of the file: pages are
    read on demand and shared with the page cache, so a 4 GB dataset costs no 4 GB copy.

    The map is copy-on-write (writable for torch, never written back). cifarctl replaces files
    by rename, never in place, so a map stays valid while a new file is written beside it.
    """
    import numpy as np

    entries, meta = read_header(path)
    mm = None
    if any(math.prod(e.shape) for e in entries.values()):
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, e in entries.items():
        if math.prod(e.shape) == 0:
            out[name] = np.zeros(e.shape, e.dtype)
            continue
        out[name] = np.ndarray(e.shape, e.dtype, buffer=mm, offset=e.start)
    if framework == "pt":
        import torch

        out = {k: torch.from_numpy(v) for k, v in out.items()}
    return out, meta, Pages(mm)


def crc32s(path: Path | str, names: list[str] | None = None) -> dict[str, str]:
    """crc32 (8 hex digits) of each tensor's bytes, read in chunks with plain reads: checking a
    file leaves no mapped pages behind in the process's resident memory."""
    entries, _ = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name in sorted(names or entries):
            e, crc = entries[name], 0
            f.seek(e.start)
            for pos in range(e.start, e.end, _COPY_CHUNK):
                crc = zlib.crc32(f.read(min(_COPY_CHUNK, e.end - pos)), crc)
            out[name] = f"{crc:08x}"
    return out


class Spool:
    """A tensor written in pieces to a temporary raw file, e.g. images as they are decoded: the
    leading dimension grows, the crc32 is kept as the bytes pass. Memory stays O(piece)."""

    def __init__(self, folder: Path, name: str, item_shape: tuple[int, ...], dtype: str) -> None:
        import numpy as np

        self.path = Path(folder) / f".spool-{os.getpid()}-{name}.raw"
        self.item_shape, self.dtype = tuple(item_shape), np.dtype(dtype)
        self.count, self.crc = 0, 0
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by finish()/discard()

    def append(self, array: Any) -> None:
        """Add items (k, *item_shape) of this spool's dtype."""
        import numpy as np

        a = np.ascontiguousarray(array, dtype=self.dtype)
        if a.shape[1:] != self.item_shape:
            raise ValueError(f"spool of {self.item_shape} items got {a.shape[1:]}")
        data = memoryview(a).cast("B")
        self._f.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.count += len(a)

    def finish(self) -> Spool:
        """Close the file for writing; the spool can then be read or saved."""
        if not self._f.closed:
            self._f.close()
        return self

    def read(self, start: int, stop: int) -> Any:
        """Items [start, stop) as a numpy array (a plain read, not a map)."""
        import numpy as np

        item = self.dtype.itemsize * math.prod(self.item_shape)
        with open(self.path, "rb") as f:
            f.seek(start * item)
            data = f.read((stop - start) * item)
        return np.frombuffer(data, self.dtype).reshape(-1, *self.item_shape)

    def discard(self) -> None:
        """Close and delete the temporary file."""
        self._f.close()
        self.path.unlink(missing_ok=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.item_shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize * math.prod(self.item_shape)


def save_spools(path: Path | str, spools: dict[str, Spool], metadata: dict[str, str],
                check: Callable[[Path], None] | None = None) -> None:
    """Write finished spools as one safetensors file, atomically, copying chunk by chunk (the
    header goes first, so every size and checksum is known before a byte is written)."""
    # Wider dtypes first, as safetensors orders them: every tensor then starts aligned to its item size.
    names = sorted(spools, key=lambda k: (-spools[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        s = spools[name].finish()
        dtype = next(k for k, v in _DTYPES.items() if v == s.dtype.name)
        header[name] = {"dtype": dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with fsutil.atomic_path(path) as tmp:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                with open(spools[name].path, "rb") as f:
                    while chunk := f.read(_COPY_CHUNK):
                        out.write(chunk)
        if check is not None:
            check(tmp)
