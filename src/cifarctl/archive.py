"""Safe handling of untrusted archives: tar extraction that cannot escape its folder, and a
restricted unpickler for the CIFAR-10 python batches."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from cifarctl.errors import CifarctlError

# The only globals a CIFAR-10 batch pickle needs: numpy's array reconstruction, plus
# _codecs.encode, which protocol-2 pickles written by Python 3 use for raw bytes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in parts:
        return "'..' in its path"
    if member.issym() or member.islnk():
        return "a link"
    if not (member.isfile() or member.isdir()):
        return "a device, fifo or other special file"
    return None


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Unpack a .tar/.tar.gz into `dest`, refusing the whole archive if any member could land
    outside it (absolute paths, '..', symlinks, hard links, devices).

    Members are checked before anything is written and then written by hand from their bytes,
    so the result does not depend on tarfile's extraction filters (Python 3.10 to 3.14 alike).
    """
    dest = dest.resolve()
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            for member in members:
                reason = _unsafe_reason(member)
                if reason is None and not (dest / member.name).resolve().is_relative_to(dest):
                    reason = "a path outside the target folder"
                if reason:
                    raise CifarctlError(f"refusing {archive.name}: member {member.name!r} is {reason}")
            written = []
            for member in members:
                target = dest / member.name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None  # regular files always have data
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written.append(target)
            return written
    except (tarfile.TarError, EOFError, OSError) as err:
        raise CifarctlError(f"{archive} is not a readable tar archive ({err}); check the file or --source") from err


def tar_names(archive: Path) -> list[str]:
    """Member names of a tar archive, read without extracting anything."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            return tar.getnames()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise CifarctlError(f"{archive} is not a readable tar archive ({err}); check the file or --source") from err


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


def load_pickle_batch(path: Path) -> dict[str, Any]:
    """Read one CIFAR-10 python batch, admitting only numpy arrays and plain containers."""
    data = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except CifarctlError as err:
        raise CifarctlError(f"{path.name}: {err}") from err
    except Exception as err:
        raise CifarctlError(f"{path.name} is not a readable CIFAR-10 batch ({err}); re-download it") from err
    if not isinstance(obj, dict):
        raise CifarctlError(f"{path.name} is not a CIFAR-10 batch (a {type(obj).__name__}, not a dict)")
    return obj
