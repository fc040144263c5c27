"""Writing files never replaces what is not ours: folders, FIFOs, sockets and devices are refused,
symlinks are written through, a full or read-only disk is one line with the old file intact, and
stale temporary files of killed processes are cleaned up."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifarctl import data, fsutil
from cifarctl.cli import app
from cifarctl.errors import CifarctlError, UsageError
from modelfiles import brightness_weights

DEAD_PID = 2**22 + 12345  # above Linux's default pid_max: no process has it


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def make_special(path: Path, kind: str) -> socket.socket | None:
    """Create a folder, FIFO, socket or (as root) character device at `path`; returns a socket to close."""
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        return sock
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("mknod needs root")
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null twin inside tmp_path
    return None


KINDS = ["folder", "fifo", "socket", "device"]


@pytest.mark.parametrize("kind", KINDS)
def test_atomic_write_refuses_anything_but_a_regular_file(tmp_path: Path, kind: str) -> None:
    """A write to a folder, FIFO, socket or device node raises a UsageError and leaves it in place."""
    target = tmp_path / "out.png"
    sock = make_special(target, kind)
    try:
        with pytest.raises(UsageError, match="not a regular file"):
            fsutil.write_bytes(target, b"data")
        assert os.path.lexists(target) and not target.is_file()
        assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp file left
    finally:
        if sock:
            sock.close()


def test_symlink_named_explicitly_is_written_through(tmp_path: Path) -> None:
    """Writing to a symlink replaces the file it points to and keeps the link; a link to a FIFO is refused."""
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    fsutil.write_bytes(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to_pipe.png").symlink_to(tmp_path / "pipe")
    with pytest.raises(UsageError, match="FIFO"):
        fsutil.write_bytes(tmp_path / "to_pipe.png", b"x")


@pytest.mark.parametrize("code, word", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_full_or_read_only_disk_keeps_the_old_file(tmp_path: Path, monkeypatch, code: int, word: str) -> None:
    """ENOSPC or EROFS while saving is one error naming the path; the old file is intact and no temp file remains."""
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"previous")

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fsutil.os, "fsync", fail)
    with pytest.raises(CifarctlError, match=word) as info:
        fsutil.write_bytes(target, b"new contents")
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_stale_temp_files_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    """Temp files left by a killed process are removed on the next write; a live process's are kept."""
    stale = tmp_path / f".weights.safetensors.{DEAD_PID}.abc123.tmp"
    live = tmp_path / f".weights.safetensors.{os.getppid()}.xyz789.tmp"
    other = tmp_path / f".metrics.csv.{DEAD_PID}.q.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"half")
    fsutil.write_bytes(tmp_path / "weights.safetensors", b"ok")
    assert not stale.exists() and live.exists() and other.exists()
    fsutil.clean_stale_temps(tmp_path)
    assert not other.exists() and live.exists()


def test_stale_extraction_folder_is_cleaned_on_the_next_download(tmp_path: Path) -> None:
    """A .extract-PID folder and the .spool-PID-* files of a killed import are removed by the next
    download into that data dir; the new import leaves no spool of its own behind."""
    from fakecifar import build_image_tree

    data_dir = tmp_path / "data"
    stale = data_dir / f".extract-{DEAD_PID}"
    (stale / "train").mkdir(parents=True)
    spool = data_dir / f".spool-{DEAD_PID}-0-train_images.raw"
    spool.write_bytes(b"\0" * 3072)
    tree = build_image_tree(tmp_path / "src", ["cat", "dog"])
    result = cli("download", "--data-dir", data_dir, "--source", tree.root)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and not spool.exists()
    assert not list(data_dir.glob(".spool-*"))


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_cli_outputs_refuse_special_files(tiny_data_dir: Path, tmp_path: Path, kind: str) -> None:
    """show-batch --out, evaluate --confusion and a run's own files refuse a folder, FIFO or device with exit 2."""
    target = tmp_path / "grid.png"
    make_special(target, kind)
    result = cli("show-batch", "--data-dir", tiny_data_dir, "--out", target, "--no-preview")
    assert result.exit_code == 2 and "not a regular file" in result.output, result.output
    weights = brightness_weights(tmp_path / "run" / "weights.safetensors")
    make_special(tmp_path / "run" / "confusion.png", kind)
    result = cli("evaluate", weights, "--data-dir", tiny_data_dir, "--confusion")
    assert result.exit_code == 2 and "not a regular file" in result.output, result.output
    run = tmp_path / "newrun"
    run.mkdir()
    make_special(run / "metrics.csv", kind)
    result = cli("train", "--data-dir", tiny_data_dir, "--epochs", "1", "-o", run)
    assert result.exit_code == 2 and "not a regular file" in result.output, result.output
    assert "Traceback" not in result.output


def test_killed_download_leaves_no_half_written_cache(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A cache is only ever replaced whole: after a subprocess is killed mid-write the old cache still verifies."""
    before = data.cache_path(tiny_data_dir).read_bytes()
    code = ("import os, numpy as np\n"
            "from cifarctl import fsutil\n"
            f"with fsutil.atomic_path({str(data.cache_path(tiny_data_dir))!r}) as tmp:\n"
            "    tmp.write_bytes(b'partial')\n"
            "    os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert data.cache_path(tiny_data_dir).read_bytes() == before
    data.load_dataset(tiny_data_dir)  # still valid; the stale temp is removed by the next write
