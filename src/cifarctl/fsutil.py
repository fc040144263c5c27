"""Writing files safely: atomic replacement of regular files only, through symlinks the user named,
one-line errors for a full or read-only disk, and cleanup of what a killed process left behind."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cifarctl.errors import CifarctlError, UsageError

# Temporary files are named .<final name>.<pid>.<random>.tmp, so a later run can tell whose they are.
_TEMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind_of(mode: int) -> str:
    """'a folder', 'a FIFO', ... for an st_mode that is not a regular file."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def output_target(path: Path | str) -> Path:
    """The file a write to `path` really replaces: `path` itself, or the file a symlink named
    explicitly points to (the link is written through, never replaced). Raises UsageError when
    that is anything but a regular file or a name that does not exist yet."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        st = target.stat()
    except FileNotFoundError:
        return target
    except NotADirectoryError as err:
        raise UsageError(f"cannot write {path}: a part of that path is a file, not a folder") from err
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from err
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"refusing to write {path}: it exists and is {kind_of(st.st_mode)}, not a regular file; "
                         "choose another path")
    return target


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: Path, prefix: str = "") -> None:
    """Remove temporary files in `folder` (whose names start with `prefix`) that were left by a
    process that no longer runs: a kill between creating and renaming one."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match and entry.name.startswith(prefix) and not pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)


def temp_name(final: Path) -> str:
    """A prefix for a temporary sibling of `final` that records our pid."""
    return f".{final.name}.{os.getpid()}."


def disk_error(path: Path | str, err: OSError) -> CifarctlError:
    """One line for an OSError while writing `path`: the disk is full, read-only, or forbidden."""
    hints = {errno.ENOSPC: "the disk is full; free some space",
             errno.EDQUOT: "the disk quota is used up; free some space",
             errno.EROFS: "the file system is read-only; choose another place",
             errno.EACCES: "permission denied; choose another place",
             errno.EPERM: "permission denied; choose another place"}
    hint = hints.get(err.errno, f"{err.strerror or err}")
    return CifarctlError(f"cannot write {path}: {hint}; the previous file, if any, is unchanged",
                         exit_code=2 if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else 1)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside the file `final` names; on success fsync it and rename it over
    that file. A symlink is written through; anything but a regular file is refused (UsageError).
    A full or read-only disk raises one CifarctlError naming `final`; the temporary file is removed
    and the previous file stays as it was."""
    named = Path(final)
    final = output_target(named)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(final.parent, f".{final.name}.")
        fd, name = tempfile.mkstemp(prefix=temp_name(final), suffix=".tmp", dir=final.parent)
        os.close(fd)
    except OSError as err:
        raise disk_error(named, err) from err
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = output_target(named)  # it may have changed while we wrote: check again just before
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_error(named, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def point_symlink(link: Path, target: Path) -> None:
    """Make `link` a relative symlink to `target`, replacing an old symlink in one rename."""
    rel = os.path.relpath(target, link.parent)
    tmp = link.with_name(f"{temp_name(link)}link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
