"""`cifarctl show-batch`: the grid PNG, the printed labels, predictions, and the terminal preview."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cifarctl.cli import app
from cifarctl.data import CLASSES, load_dataset
from conftest import write_tiny_cache
from modelfiles import brightness_weights

TERMINAL = {"TTY_COMPATIBLE": "1", "COLORTERM": "truecolor", "COLUMNS": "100"}


def cli(*args: object, **env: str):
    return CliRunner().invoke(app, [str(a) for a in args], env=env or None)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """No cifarctl or terminal settings from the environment."""
    for var in ("CIFARCTL_DATA_DIR", "CIFARCTL_SOURCE", "TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A tiny cache: 100 train and 50 test images."""
    return write_tiny_cache(tmp_path_factory.mktemp("d") / "data", n_train=100, n_test=50)


def test_grid_png_has_the_expected_size_and_labels_are_printed(data_dir: Path, tmp_path: Path) -> None:
    """16 images make a 4x4 grid of 140x156-pixel tiles (128x128 image, label line); the labels are printed."""
    out = tmp_path / "grid.png"
    result = cli("show-batch", "--data-dir", data_dir, "--seed", "7", "--out", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (4 * 140, 4 * 156)
    s = json.loads(cli("show-batch", "--data-dir", data_dir, "--seed", "7", "--out", out, "--json").stdout)
    assert len(s["labels"]) == 16 and set(s["labels"]) <= set(CLASSES)
    assert result.stdout.split()[:16] == s["labels"]  # the tutorial's line of labels
    assert f"saved {out} (560x624)" in result.stdout.replace("\n", " ")


def test_size_follows_n_and_scale_and_split(data_dir: Path, tmp_path: Path) -> None:
    """-n 5 --scale 2 makes 3 columns and 2 rows of 76x92-pixel tiles, drawn from the chosen split."""
    out = tmp_path / "small.png"
    s = json.loads(cli("show-batch", "--data-dir", data_dir, "-n", "5", "--scale", "2", "--split", "test",
                       "--seed", "1", "--out", out, "--json").stdout)
    assert Image.open(out).size == (3 * 76, 2 * 92) and s["size"] == [228, 184]
    assert s["split"] == "test" and len(s["indices"]) == 5 and max(s["indices"]) < 50


def test_same_seed_same_batch(data_dir: Path, tmp_path: Path) -> None:
    """--seed makes the batch repeatable; without it a fresh seed is chosen and printed."""
    runs = [json.loads(cli("show-batch", "--data-dir", data_dir, "--seed", "3", "--out", tmp_path / f"{i}.png",
                           "--json").stdout) for i in range(2)]
    assert runs[0]["indices"] == runs[1]["indices"]
    assert (tmp_path / "0.png").read_bytes() == (tmp_path / "1.png").read_bytes()
    result = cli("show-batch", "--data-dir", data_dir, "--out", tmp_path / "x.png")
    assert re.search(r"--seed \d+ shows this batch again", result.stdout)


def test_weights_show_predictions_and_mark_wrong_ones_red(data_dir: Path, tmp_path: Path) -> None:
    """With --weights each tile says pred and true class; wrong ones get a red frame, right ones none."""
    weights = brightness_weights(tmp_path / "w.safetensors", [25 * k + 13 for k in range(10)])
    out = tmp_path / "pred.png"
    result = cli("show-batch", "--data-dir", data_dir, "--weights", weights, "--seed", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "GroundTruth:" in result.stdout and "Predicted:" in result.stdout
    s = json.loads(cli("show-batch", "--data-dir", data_dir, "-w", weights, "--seed", "2", "--out", out,
                       "--json").stdout)
    wrong = [p != t for p, t in zip(s["predicted"], s["labels"])]
    assert any(wrong) and not all(wrong) and s["correct"] == wrong.count(False)
    assert f"{s['correct']} of 16 correct" in result.stdout
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (4 * 172, 4 * 140, 3)  # two label lines per tile with predictions
    for i, is_wrong in enumerate(wrong):
        y, x = (i // 4) * 172 + 6 + 64, (i % 4) * 140 + 4  # the middle of the tile's left frame
        assert tuple(grid[y, x]) == ((200, 0, 0) if is_wrong else (255, 255, 255)), i


def test_not_a_terminal_prints_no_escape_codes(data_dir: Path, tmp_path: Path) -> None:
    """Piped output has labels and no escape codes or half blocks at all."""
    result = cli("show-batch", "--data-dir", data_dir, "--seed", "1", "--out", tmp_path / "g.png")
    assert result.exit_code == 0
    assert "\x1b" not in result.output and "▀" not in result.output


def _halfblock_cells(text: str) -> list[list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Per output line, the (foreground, background) truecolor pair of every '▀' cell."""
    lines = []
    for line in text.splitlines():
        cells, fg, bg = [], None, None
        for codes, chars in re.findall(r"\x1b\[([0-9;]*)m([^\x1b]*)", line):
            if m := re.search(r"38;2;(\d+);(\d+);(\d+)", codes):
                fg = tuple(map(int, m.groups()))
            if m := re.search(r"48;2;(\d+);(\d+);(\d+)", codes):
                bg = tuple(map(int, m.groups()))
            cells += [(fg, bg)] * chars.count("▀")
        if cells:
            lines.append(cells)
    return lines


def test_terminal_preview_draws_each_image_as_32x16_half_blocks(data_dir: Path, tmp_path: Path) -> None:
    """On a truecolor terminal without a graphics protocol, each image is 32x16 cells: top pixel fg, bottom pixel bg."""
    result = cli("show-batch", "--data-dir", data_dir, "--seed", "5", "-n", "4", "--out", tmp_path / "g.png", **TERMINAL)
    assert result.exit_code == 0, result.output
    s = json.loads(cli("show-batch", "--data-dir", data_dir, "--seed", "5", "-n", "4", "--out", tmp_path / "g.png",
                       "--json").stdout)
    lines = _halfblock_cells(result.stdout)
    assert len(lines) == 2 * 16 and all(len(cells) in (3 * 32, 32) for cells in lines)  # 3 per row at 100 columns
    first = load_dataset(data_dir).train.images[s["indices"][0]].numpy()  # (32, 32, 3)
    for r, cells in enumerate(lines[:16]):
        assert [fg for fg, _ in cells[:32]] == [tuple(p) for p in first[2 * r]]
        assert [bg for _, bg in cells[:32]] == [tuple(p) for p in first[2 * r + 1]]
    assert s["labels"][0] in result.stdout


def test_no_preview_on_a_terminal_draws_no_images(data_dir: Path, tmp_path: Path) -> None:
    """--no-preview on a terminal prints only the labels: no half blocks, no graphics escape sequences."""
    result = cli("show-batch", "--data-dir", data_dir, "--no-preview", "--out", tmp_path / "g.png", **TERMINAL)
    assert result.exit_code == 0
    assert "▀" not in result.output and "\x1b_G" not in result.output and "\x1bP" not in result.output


def test_too_many_images_is_a_usage_error(data_dir: Path, tmp_path: Path) -> None:
    """-n beyond the split's size exits 2 with one line and writes nothing."""
    result = cli("show-batch", "--data-dir", data_dir, "--split", "test", "-n", "60", "--out", tmp_path / "g.png")
    assert result.exit_code == 2 and "more than the 50 images in the test split" in result.stderr
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("n, scale", [(1, 1), (1, 4), (7, 3), (16, 2)])
def test_every_tile_holds_its_image_magnified_with_white_around(n: int, scale: int) -> None:
    """Each image sits at its tile's place, magnified without smoothing, on a white grid of grid_size()."""
    import numpy as np

    from cifarctl import grid

    images = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    png = np.asarray(grid.render_grid(images, ["x"] * n, None, scale))
    width, height = grid.grid_size(n, scale, False)
    assert png.shape == (height, width, 3)
    cols, rows = grid.grid_shape(n)
    tile_w, tile_h, side = width // cols, height // rows, 32 * scale
    for i, image in enumerate(images):
        x0, y0 = (i % cols) * tile_w + grid.PAD, (i // cols) * tile_h + grid.PAD
        tile = png[y0:y0 + side, x0:x0 + side]
        assert np.array_equal(tile, image.repeat(scale, 0).repeat(scale, 1))
    assert (png[:grid.PAD] == 255).all() and (png[:, :grid.PAD] == 255).all()


@pytest.mark.parametrize("failure", [ImportError("No module named 'torchvision'"),
                                     RuntimeError("operator torchvision::nms does not exist")])
def test_a_torchvision_that_cannot_load_is_one_line_naming_the_fix(data_dir: Path, tmp_path: Path, monkeypatch,
                                                                  failure: Exception) -> None:
    """A missing torchvision, or one built for another torch, is one line naming the matching install; no file."""
    import sys
    import types

    broken = types.ModuleType("torchvision.utils")

    def fail(name: str):
        raise failure

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "torchvision.utils", broken)
    out = tmp_path / "grid.png"
    result = cli("show-batch", "--data-dir", data_dir, "--out", out)
    assert result.exit_code == 1 and not out.exists()
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "does not load with torch" in line and "download.pytorch.org/whl/cpu" in line
    assert str(failure) in line
