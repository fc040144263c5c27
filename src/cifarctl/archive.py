"""Safe handling of untrusted archives: tar extraction that cannot escape its folder or fill the
disk, and a restricted unpickler for the CIFAR-10 python batches."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import pickle
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from cifarctl.config import env_number
from cifarctl.errors import CifarctlError

# The official archive unpacks to about 178 MB; 8 GiB admits any image-folder dataset a laptop
# would import as a tar, yet stops a gzip bomb (1 GiB of zeros compresses to 1 MiB) long before
# the disk fills.
DEFAULT_MAX_IMPORT_BYTES = 8 << 30
# Each member costs an inode and a TarInfo (about 0.5 KiB of memory); ImageNet's 1.3 M files fit.
DEFAULT_MAX_IMPORT_MEMBERS = 2_000_000
# The official batch files are about 31 MB each; a pickle is read whole, so this bounds memory.
MAX_BATCH_BYTES = 200_000_000
# Tar headers (pax records, GNU long names) are read in one call; real ones are under 1 MiB.
_MAX_HEADER_READ = 16 << 20
_ENV_MAX_IMPORT = "CIFARCTL_MAX_IMPORT_BYTES"
_RAISE_IT = f"if the archive is genuine, set {_ENV_MAX_IMPORT} to a larger number of bytes"

# The only globals a CIFAR-10 batch pickle needs: numpy's array reconstruction, plus
# _codecs.encode, which protocol-2 pickles written by Python 3 use for raw bytes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
# Decompressors by magic number: the formats tarfile's "r:*" reads.
_DECOMPRESSORS: tuple[tuple[bytes, Any], ...] = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def max_import_bytes() -> int:
    """The unpacked-size ceiling for archives: $CIFARCTL_MAX_IMPORT_BYTES, else DEFAULT_MAX_IMPORT_BYTES."""
    return env_number(_ENV_MAX_IMPORT, DEFAULT_MAX_IMPORT_BYTES, int)


class _Bounded:
    """A decompressed tar stream that refuses to be read or skipped past `limit` bytes.

    tarfile skips member data by seeking, and a seek forward in a compressed stream decompresses
    everything in between, so the limit is on positions, not just on bytes returned.
    """

    def __init__(self, raw: BinaryIO, limit: int, archive: Path) -> None:
        self._raw, self.limit, self._archive = raw, limit, archive

    def _check(self, end: int) -> None:
        if end > self.limit:
            raise CifarctlError(f"refusing {self._archive.name}: it unpacks to more than {self.limit:,} bytes "
                                f"(a decompression bomb?); {_RAISE_IT}")

    def read(self, size: int | None = -1) -> bytes:
        pos = self._raw.tell()
        if size is None or size < 0:
            size = max(0, min(self.limit - pos, _MAX_HEADER_READ))  # tarfile never asks for "all"
        elif size > _MAX_HEADER_READ:
            # Data is read in small chunks; only a header (a pax record, a GNU long name) is read at once.
            raise CifarctlError(f"refusing {self._archive.name}: a tar header claims {size:,} bytes of "
                                "metadata; the archive is damaged or hostile")
        self._check(pos + size)
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset + (self._raw.tell() if whence == io.SEEK_CUR else 0)
        if whence == io.SEEK_END:
            raise io.UnsupportedOperation("tar streams are not read from the end")
        self._check(target)
        return self._raw.seek(target)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def _open_tar(archive: Path, limit: int) -> tuple[tarfile.TarFile, list[Any]]:
    """`archive` (plain, gzip, bzip2 or xz) as a TarFile whose stream stops at `limit` unpacked
    bytes; also returns the file objects to close after it."""
    raw = open(archive, "rb")
    try:
        magic = raw.read(6)
        raw.seek(0)
        stream: Any = raw
        for prefix, decompressor in _DECOMPRESSORS:
            if magic.startswith(prefix):
                stream = decompressor(raw)
        return tarfile.open(fileobj=_Bounded(stream, limit, archive), mode="r:"), [stream, raw]
    except BaseException:
        raw.close()
        raise


def _scan(tar: tarfile.TarFile, archive: Path, limit: int, max_members: int) -> list[tarfile.TarInfo]:
    """Every member's header, refusing a member whose declared size would end past `limit`
    before its data is skipped (skipping decompresses it), and more than `max_members` members."""
    members: list[tarfile.TarInfo] = []
    while (member := tar.next()) is not None:
        if len(members) >= max_members:
            raise CifarctlError(f"refusing {archive.name}: it has more than {max_members:,} members; "
                                "unpack it yourself and pass the folder as --source")
        if member.offset_data + member.size > limit:
            left = max(0, limit - member.offset_data)
            raise CifarctlError(f"refusing {archive.name}: member {member.name!r} declares {member.size:,} bytes, "
                                f"more than the {left:,} left of the {limit:,}-byte unpacking limit; {_RAISE_IT}")
        members.append(member)
    return members


def _read_error(archive: Path, err: BaseException) -> CifarctlError:
    return CifarctlError(f"{archive} is not a readable tar archive ({err or type(err).__name__}); "
                         "check the file or --source")


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in parts:
        return "'..' in its path"
    if member.issym() or member.islnk():
        return "a link"
    if member.issparse():  # its declared size need not match the bytes stored: refused, not guessed at
        return "a sparse file"
    if not (member.isfile() or member.isdir()):
        return "a device, fifo or other special file"
    return None


def safe_extract(archive: Path, dest: Path, *, max_bytes: int | None = None,
                 max_members: int = DEFAULT_MAX_IMPORT_MEMBERS) -> list[Path]:
    """Unpack a .tar/.tar.gz/.tar.bz2/.tar.xz into `dest`, refusing the whole archive if any member
    could land outside it (absolute paths, '..', links, devices, sparse files) or if it unpacks
    to more than `max_bytes` (None: max_import_bytes()) or holds more than `max_members` members.

    Every header is checked before anything is written, then members are written by hand from
    their bytes, so the result does not depend on tarfile's extraction filters (Python 3.10 to 3.14
    alike). A file that fails half-way is deleted; the caller removes `dest` itself.
    """
    limit = max_import_bytes() if max_bytes is None else max_bytes
    dest = dest.resolve()
    try:
        with _opened_tar(archive, limit) as tar:
            members = _scan(tar, archive, limit, max_members)
            for member in members:
                reason = _unsafe_reason(member)
                if reason is None and not (dest / member.name).resolve().is_relative_to(dest):
                    reason = "a path outside the target folder"
                if reason:
                    raise CifarctlError(f"refusing {archive.name}: member {member.name!r} is {reason}")
            return _write_members(tar, members, dest, archive, limit)
    except _READ_ERRORS as err:
        raise _read_error(archive, err) from err


@contextlib.contextmanager
def _opened_tar(archive: Path, limit: int) -> Iterator[tarfile.TarFile]:
    """The archive as a streaming tar bounded to `limit` decompressed bytes; closed afterwards."""
    tar, streams = _open_tar(archive, limit)
    try:
        yield tar
    finally:
        tar.close()
        for stream in streams:
            stream.close()


def _write_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path, archive: Path,
                   limit: int) -> list[Path]:
    written: list[Path] = []
    total = 0  # bytes written so far; the headers promised at most `limit`, this makes sure of it
    for member in members:
        target = dest / member.name
        src = None if member.isdir() else tar.extractfile(member)
        try:
            if src is None:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            out = open(target, "wb")
        except OSError as err:
            raise _write_error(target, err) from err
        try:
            with src, out:
                while block := src.read(1 << 20):  # 1 MiB at a time: memory stays flat for any member
                    total += len(block)
                    if total > limit:
                        raise CifarctlError(f"refusing {archive.name}: it unpacks to more than {limit:,} bytes "
                                            f"(a decompression bomb?); {_RAISE_IT}")
                    try:
                        out.write(block)
                    except OSError as err:
                        raise _write_error(target, err) from err
        except BaseException:
            target.unlink(missing_ok=True)  # never leave a half-written file, whatever stopped it
            raise
        written.append(target)
    return written


def _write_error(target: Path, err: OSError) -> CifarctlError:
    return CifarctlError(f"cannot write {target}: {err.strerror or err}; free some disk space or pass another "
                         "--data-dir")


def tar_names(archive: Path, *, max_bytes: int | None = None,
              max_members: int = DEFAULT_MAX_IMPORT_MEMBERS) -> list[str]:
    """Member names of a tar archive, read without extracting anything and within the same limits
    as `safe_extract` (reading the headers of a gzip bomb would otherwise decompress all of it)."""
    limit = max_import_bytes() if max_bytes is None else max_bytes
    try:
        with _opened_tar(archive, limit) as tar:
            return [m.name for m in _scan(tar, archive, limit, max_members)]
    except _READ_ERRORS as err:
        raise _read_error(archive, err) from err


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise CifarctlError(
                f"refusing to unpickle: the data names {module}.{name}, which CIFAR-10 batches never need; "
                "the archive is not genuine CIFAR-10"
            )
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if _has_numpy_core_private() else module
        return super().find_class(module, name)


def _has_numpy_core_private() -> bool:
    import importlib.util

    return importlib.util.find_spec("numpy._core") is not None


def load_pickle_batch(path: Path, max_bytes: int = MAX_BATCH_BYTES) -> dict[str, Any]:
    """Read one CIFAR-10 python batch (at most `max_bytes`), admitting only numpy arrays and plain containers."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # one byte more than allowed tells "too big" without reading it all
    if len(data) > max_bytes:
        raise CifarctlError(f"{path.name} is larger than {max_bytes:,} bytes, far more than a CIFAR-10 batch "
                            "(about 31 MB); the archive is not genuine CIFAR-10")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except CifarctlError as err:
        raise CifarctlError(f"{path.name}: {err}") from err
    except Exception as err:
        raise CifarctlError(f"{path.name} is not a readable CIFAR-10 batch ({err}); re-download it") from err
    if not isinstance(obj, dict):
        raise CifarctlError(f"{path.name} is not a CIFAR-10 batch (a {type(obj).__name__}, not a dict)")
    return obj
