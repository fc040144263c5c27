"""Run directories: the one module that creates, locks, resumes and points `latest` at them.

Rules (docs/train.md): a new run never writes into a folder that already holds a run unless asked
(`--overwrite`); `--resume` resolves symlinks such as runs/latest to the real folder first; one
process at a time trains into a folder (a lock file holding its pid); `latest` is only ever a
symlink, moved once a run has written weights, and a user's own file or folder of that name is
left alone.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import shlex
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cifarctl import fsutil
from cifarctl.errors import CifarctlError, UsageError

WEIGHTS = "weights.safetensors"
BEST = "best.safetensors"  # the epoch with the best validation accuracy (--val-split)
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.csv"
CONFIG = "config.json"
CURVES = "curves.png"
LOCK = ".lock"
LATEST = "latest"
METRIC_FIELDS = ["kind", "epoch", "step", "images", "lr", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc",
                 "test_acc_plain", "elapsed_s", "train_s", "images_per_s"]


class RunLocked(CifarctlError):
    """Another process is training into the same run directory."""


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory."""

    root: Path

    weights = property(lambda self: self.root / WEIGHTS)
    best = property(lambda self: self.root / BEST)
    checkpoint = property(lambda self: self.root / CHECKPOINT)
    metrics = property(lambda self: self.root / METRICS)
    config = property(lambda self: self.root / CONFIG)
    curves = property(lambda self: self.root / CURVES)

    def files(self) -> dict[str, str]:
        """The run's files by name, as the summary lists them (best only once it exists)."""
        names = ("weights", "checkpoint", "metrics", "config", "curves") + (("best",) if self.best.exists() else ())
        return {name: str(getattr(self, name)) for name in names}

    def holds_a_run(self) -> bool:
        """True when a run has saved weights or a checkpoint here (what a new run would destroy)."""
        return any(os.path.lexists(self.root / name) for name in (WEIGHTS, CHECKPOINT, BEST))


def default_output_dir(model: str, root: Path = Path("runs")) -> Path:
    """runs/<model>-<timestamp>, with a counter if two runs start in the same second."""
    base = root / f"{model}-{datetime.now():%Y%m%d-%H%M%S}"
    out, n = base, 1
    while os.path.lexists(out):
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _mkdir_error(path: Path, err: OSError) -> UsageError:
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        why = "a part of that path is a file, not a folder"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "the place is read-only"
    else:
        why = err.strerror or str(err)
    return UsageError(f"cannot use {path} as a run directory: {why}; choose another --output-dir")


def create(path: Path) -> RunDir:
    """The run directory at `path`, made if missing; refused (UsageError) when `path` is a file or
    anything else that is not a folder, lies under a file, or cannot be written."""
    path = Path(path)
    try:
        st = path.stat() if os.path.lexists(path) else None
    except OSError as err:
        raise _mkdir_error(path, err) from err
    if st is not None and not stat.S_ISDIR(st.st_mode):
        what = "a file" if stat.S_ISREG(st.st_mode) else fsutil.kind_of(st.st_mode)
        raise UsageError(f"cannot use {path} as a run directory: it is {what}; choose another --output-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _mkdir_error(path, err) from err
    return RunDir(path)


def check_outputs(run: RunDir) -> None:
    """Refuse up front, before any training, a run file that exists and is not a regular file."""
    for path in (*run.files().values(), run.best):
        fsutil.output_target(path)


def refuse_existing(run: RunDir, overwrite: bool) -> None:
    """A new run never replaces an earlier one's files unless asked (`--overwrite`)."""
    if run.holds_a_run() and not overwrite:
        raise UsageError(f"{run.root} already holds a run; continue it with --resume {shlex.quote(str(run.root))}, "
                         "replace it with --overwrite, or choose another --output-dir")


def resolve_resume(path: Path) -> RunDir:
    """The run directory `--resume` names: symlinks (runs/latest) resolved to the real folder, a
    checkpoint file taken as its folder. Raises UsageError when there is no run to resume."""
    path = Path(path)
    if path.name == CHECKPOINT and not path.is_dir():
        path = path.parent
    real = Path(os.path.realpath(path))
    if not real.is_dir():
        what = "does not exist" if not os.path.lexists(path) else "is not a folder"
        raise UsageError(f"cannot resume {path}: it {what}; pass a run directory written by cifarctl train")
    run = RunDir(real)
    if not run.checkpoint.is_file():
        raise UsageError(f"cannot resume {path}: it holds no {CHECKPOINT}; is it a cifarctl run directory?")
    return run


@contextlib.contextmanager
def locked(run: RunDir) -> Iterator[None]:
    """Hold the run directory's lock for the whole run; a second process is refused at once with
    the pid of the first. The lock file is removed when the run ends."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    path = run.root / LOCK
    fsutil.output_target(path)  # a folder or FIFO called .lock is refused, not opened
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise _mkdir_error(run.root, err) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"another cifarctl train (pid {holder}) is writing to {run.root}; wait for it to "
                            "finish or choose another --output-dir") from None
        # The holder before us may have removed the file between our open and our lock: retry then.
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def point_latest(run: RunDir, warn: Any = None) -> None:
    """Point <parent>/latest at this run. Only a symlink is ever replaced: a user's own file or
    folder called latest is left alone, with a warning through `warn(message)`."""
    link = run.root.parent / LATEST
    real = Path(os.path.realpath(run.root))
    if Path(os.path.abspath(link)) == real:
        return  # the run *is* the folder called latest: a link to itself would break every default
    if os.path.lexists(link) and not link.is_symlink():
        if warn is not None:
            warn(f"{link} is not a symlink made by cifarctl; left as it is (runs/latest not updated)")
        return
    if link.is_symlink() and os.path.realpath(link) == str(real):
        return
    try:
        fsutil.point_symlink(link, real)
    except OSError:
        pass  # a file system without symlinks: the run itself is complete


def clean_stale(run: RunDir) -> None:
    """Remove temporary files a killed run left in the folder."""
    fsutil.clean_stale_temps(run.root)


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """metrics.csv: one row per logging point and per epoch, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fsutil.write_text(path, buf.getvalue())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.csv, or [] when there is none."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _stderr_line(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def weights_file(path: Path, note: Any = _stderr_line) -> Path:
    """The weights file a command was given: the file itself, or a run directory's (runs/latest
    included) weights.safetensors. Raises UsageError naming what is missing.

    `pretrained` names the bundled weights (a file or folder of that name wins, so an existing
    run called pretrained still works). The default, runs/latest, falls back to them when there
    is no runs/latest at all, and says so once through `note(message)` (stderr by default), so a
    fresh install can predict at once.
    """
    from cifarctl import pretrained

    path = Path(path)
    if str(path) == pretrained.NAME and not os.path.lexists(path):
        return pretrained.path()
    latest = Path("runs") / LATEST
    if path in (latest, latest / WEIGHTS) and not os.path.lexists(latest) and pretrained.FILE.is_file():
        if note is not None:
            note(pretrained.fallback_note())
        return pretrained.FILE
    if path.is_dir():
        inner = path / WEIGHTS
        if not inner.is_file():
            raise UsageError(f"{path} is a folder without {WEIGHTS}; pass a weights file or a run directory "
                             "that has finished an epoch")
        return inner
    if not os.path.lexists(path):
        raise UsageError(f"weights file {path} does not exist; check the path, or train a model first "
                         "(`cifarctl train`), or use --weights pretrained")
    return path
