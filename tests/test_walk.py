"""Finding and reading image files: FIFOs, sockets, devices, symlink loops and hostile PNGs each
give one per-file error, never a hang or a traceback, and the good files are still used."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import fakecifar as fc
from cifarctl.cli import app
from cifarctl.images import ImageError, collect_images, load_image, load_images, not_regular_reason, walk_files

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files and symlinks")


def good_png(path: Path, grey: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (grey, grey, grey)).save(path)
    return path


@pytest.fixture
def fifo(tmp_path):
    """A FIFO named like an image; should anything open it for reading, a writer unblocks it within
    0.5 s and the test fails instead of hanging."""
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    done, readers = threading.Event(), []

    def unblock() -> None:
        while not done.wait(0.5):
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading, as it should be
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                readers.append(True)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join()
    assert not readers, "something opened the FIFO for reading"


def run_bounded(fn, limit_s: float = 10.0):
    """fn() in a thread; fails the test (rather than hanging it) when it outlives `limit_s`."""
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            out.append((False, err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still running after {limit_s} s"
    ok, value = out[0]
    if not ok:
        raise value
    return value


@posix_only
def test_fifo_on_the_command_line_is_an_error_not_a_hang(fifo):
    """A FIFO named on the command line is reported as not a regular file and never opened."""
    files, problems = run_bounded(lambda: collect_images([str(fifo)]))
    assert files == [] and [(p.path, p.error) for p in problems] == [(str(fifo), "not a regular file: a FIFO")]
    with pytest.raises(ImageError, match="not a regular file: a FIFO"):
        run_bounded(lambda: load_image(fifo))


@posix_only
def test_fifo_in_a_folder_is_reported_and_the_rest_predicted(fifo, tmp_path):
    """`predict FOLDER` with a FIFO among the images prints one error line for it and predicts the others."""
    from modelfiles import brightness_weights

    good = good_png(tmp_path / "sub" / "good.png")
    weights = brightness_weights(tmp_path / "w" / "weights.safetensors")
    result = run_bounded(lambda: CliRunner().invoke(app, ["predict", str(tmp_path), "-w", str(weights), "--json"]),
                         60)
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert [r["path"] for r in summary["results"]] == [str(good)]
    assert summary["errors"] == [{"path": str(fifo), "error": "not a regular file: a FIFO"}]


@posix_only
def test_symlink_loops_terminate_and_find_each_image_once(tmp_path):
    """A folder linking to itself is not descended, a self-referencing link is one error, and images are found once."""
    root = tmp_path / "photos"
    a, b = good_png(root / "a.png"), good_png(root / "deeper" / "b.png")
    (root / "deeper" / "loop").symlink_to(root, target_is_directory=True)
    (root / "back").symlink_to("..", target_is_directory=True)
    (root / "self.png").symlink_to("self.png")
    files, problems = run_bounded(lambda: walk_files(root))
    assert files == [a, b]
    assert [(p.path, p.error) for p in problems] == [(str(root / "self.png"), "a symlink loop")]
    files, problems = run_bounded(lambda: collect_images([f"{root}/**/*.png", str(root / "self.png")]))
    assert files == [a, b] and [p.error for p in problems] == ["a symlink loop", "a symlink loop"]


@posix_only
def test_dangling_symlink_is_a_per_file_error(tmp_path):
    """A symlink to a missing file is reported as broken, in a folder and on the command line."""
    good = good_png(tmp_path / "good.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "elsewhere.jpg").symlink_to(good)  # a link to a regular file is used like the file
    files, problems = walk_files(tmp_path)
    assert files == [tmp_path / "elsewhere.jpg", good]
    assert [(p.path, p.error) for p in problems] == [(str(tmp_path / "gone.png"),
                                                      f"a broken symlink (to {tmp_path / 'missing.png'})")]
    files, problems = collect_images([str(tmp_path / "gone.png")])
    assert files == [] and problems[0].error.startswith("a broken symlink")


@posix_only
def test_socket_file_is_reported_not_opened(tmp_path):
    """A Unix socket named like an image is reported as a socket; the images beside it are found."""
    good = good_png(tmp_path / "good.png")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp_path / "s.png"))
        files, problems = run_bounded(lambda: walk_files(tmp_path))
        assert files == [good] and [p.error for p in problems] == ["not a regular file: a socket"]
        with pytest.raises(ImageError, match="a socket"):
            load_image(tmp_path / "s.png")
    finally:
        sock.close()


@posix_only
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="os.mknod needs root")
def test_device_node_is_reported_not_opened(tmp_path):
    """A character device named like an image (made inside tmp_path) is reported, never read."""
    good = good_png(tmp_path / "good.png")
    device = tmp_path / "zero.png"
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers: endless if read
    except PermissionError:
        pytest.skip("this container forbids mknod")
    files, problems = run_bounded(lambda: collect_images([str(tmp_path), str(device)]))
    assert files == [good]
    assert [p.error for p in problems] == ["not a regular file: a character device"] * 2
    assert not_regular_reason(device) == "not a regular file: a character device"


# --- per-file robustness of image reading -----------------------------------------------------

HOSTILE_PNGS = {
    "ztxt_bomb.png": fc.png_with_chunks(before_idat=fc.ztxt_bomb(b"zTXt")),
    "itxt_bomb.png": fc.png_with_chunks(before_idat=fc.ztxt_bomb(b"iTXt")),
    "bomb_after_pixels.png": fc.png_with_chunks(after_idat=fc.ztxt_bomb(b"zTXt")),
    "much_text.png": fc.png_with_chunks(before_idat=b"".join(fc.ztxt_bomb(b"iTXt", 1_000_000) for _ in range(70))),
    "text_past_end.png": fc.png_with_chunks(before_idat=fc.png_chunk(b"tEXt", b"k\0v")[:-8]
                                            + (1 << 30).to_bytes(4, "big") + b"tEXt" + b"x" * 100),
}


def test_hostile_text_chunks_are_per_file_errors(tmp_path):
    """PNGs whose text chunks inflate too far or overrun the file are each one ImageError; the good file loads."""
    for name, data in HOSTILE_PNGS.items():
        (tmp_path / name).write_bytes(data)
        assert len(data) < 200_000  # small files: the danger is what they expand to
    good = good_png(tmp_path / "good.png")
    for name in HOSTILE_PNGS:
        with pytest.raises(ImageError):
            load_image(tmp_path / name)
    paths = [tmp_path / n for n in HOSTILE_PNGS] + [good]
    images, ok, problems = load_images(paths)
    assert ok == [len(paths) - 1] and images.shape == (1, 32, 32, 3)
    assert sorted(Path(p.path).name for p in problems) == sorted(HOSTILE_PNGS)


def test_large_but_allowed_text_chunk_still_loads(tmp_path):
    """A PNG with a 512 KiB tEXt chunk (under Pillow's text limits) loads normally."""
    data = fc.png_with_chunks(before_idat=fc.png_chunk(b"tEXt", b"Comment\0" + b"t" * (512 * 1024)))
    (tmp_path / "texty.png").write_bytes(data)
    out = load_image(tmp_path / "texty.png")
    assert out.shape == (32, 32, 3) and np.all(out == 128)


@pytest.mark.parametrize("kind", ["empty", "truncated", "header_only"])
def test_damaged_files_are_image_errors(tmp_path, kind):
    """A zero-byte, truncated or pixel-less PNG is an ImageError naming the problem, not a traceback."""
    whole = fc.png_with_chunks(size=64)
    data = {"empty": b"", "truncated": whole[: len(whole) - 30], "header_only": whole[:33]}[kind]
    (tmp_path / "x.png").write_bytes(data)
    with pytest.raises(ImageError, match="not an image|truncated or corrupt|cannot read"):
        load_image(tmp_path / "x.png")
