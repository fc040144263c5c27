"""`cifarctl predict`: preprocessing of every kind of image file, paths and globs, top-k output,
and bad inputs that are reported while the other files are still classified."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cifarctl.cli import app
from cifarctl.data import CLASSES
from cifarctl.images import MAX_PIXELS, load_image
from modelfiles import brightness_weights

H, W = 48, 64  # not square: every file is centre-cropped before it is resized


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights file that classifies by mean brightness, so that a colour-faithful copy of an
    image gets the same class and a darkened or whitened one does not."""
    return brightness_weights(tmp_path_factory.mktemp("w") / "weights.safetensors")


def scene(grey: bool = False) -> np.ndarray:
    """A (48, 64, 3) uint8 picture: coloured blocks and a dark disc on white, asymmetric so that
    a wrong rotation shows."""
    a = np.full((H, W, 3), 255, np.uint8)
    yy, xx = np.mgrid[:H, :W]
    a[8:40, 10:30] = (30, 60, 150)
    a[20:44, 34:58] = (200, 40, 40)
    a[(xx - 44) ** 2 + (yy - 12) ** 2 < 49] = (20, 20, 20)
    if grey:
        a = np.repeat(np.asarray(Image.fromarray(a).convert("L"))[..., None], 3, axis=2)
    return a


def _save(path: Path, im: Image.Image, **kwargs) -> Path:
    im.save(path, **kwargs)
    return path


def _on_transparent(a: np.ndarray) -> np.ndarray:
    """(H, W, 4): the scene's non-white pixels opaque, the white background fully transparent and black."""
    mask = (a != 255).any(axis=2)
    return np.dstack([np.where(mask[..., None], a, 0), mask.astype(np.uint8) * 255]).astype(np.uint8)


def make_variant(kind: str, folder: Path) -> tuple[Path, np.ndarray, float]:
    """A file of `kind` made from an 8-bit RGB original; returns (file, original, max mean abs difference allowed)."""
    rgb, grey = scene(), scene(grey=True)
    jpeg = {"quality": 95, "subsampling": 0}
    if kind == "16-bit greyscale PNG":
        return _save(folder / "g16.png", Image.fromarray(grey[..., 0].astype(np.uint16) * 257)), grey, 0.5
    if kind == "8-bit greyscale PNG":
        return _save(folder / "g8.png", Image.fromarray(grey[..., 0])), grey, 0.5
    if kind == "RGBA PNG":
        return _save(folder / "rgba.png", Image.fromarray(_on_transparent(rgb))), rgb, 0.5
    if kind == "palette PNG with transparency":
        return _save(folder / "pal.png", _palette(rgb), transparency=0), rgb, 0.5
    if kind == "CMYK JPEG":
        return _save(folder / "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), **jpeg), rgb, 2.0
    if kind == "EXIF-rotated JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored turned the other way
        stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)
        return _save(folder / "exif.jpg", stored, exif=exif, **jpeg), rgb, 2.0
    if kind == "GIF, first frame":
        frames = [Image.fromarray(rgb), Image.new("RGB", (W, H), "black")]
        return _save(folder / "anim.gif", frames[0], save_all=True, append_images=frames[1:]), rgb, 0.5
    if kind == "WebP":
        return _save(folder / "x.webp", Image.fromarray(rgb), lossless=True), rgb, 0.5
    if kind == "TIFF":
        return _save(folder / "x.tiff", Image.fromarray(rgb)), rgb, 0.5
    if kind == "BMP":
        return _save(folder / "x.bmp", Image.fromarray(rgb)), rgb, 0.5
    raise AssertionError(kind)


def _palette(rgb: np.ndarray) -> Image.Image:
    """The scene as a palette image whose index 0 is a transparent black background."""
    colours = [(0, 0, 0)] + sorted({tuple(c) for c in rgb.reshape(-1, 3)} - {(255, 255, 255)})
    index = {c: i for i, c in enumerate(colours)}
    idx = np.array([[index.get(tuple(c), 0) for c in row] for row in rgb], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([v for c in colours for v in c])
    return im


VARIANTS = ["16-bit greyscale PNG", "8-bit greyscale PNG", "RGBA PNG", "palette PNG with transparency", "CMYK JPEG",
            "EXIF-rotated JPEG", "GIF, first frame", "WebP", "TIFF", "BMP"]


@pytest.mark.parametrize("kind", VARIANTS)
def test_each_image_mode_matches_its_8bit_rgb_original(kind: str, weights: Path, tmp_path: Path) -> None:
    """A file in each mode preprocesses to the 32x32 array of the RGB original it was made from and gets its class."""
    path, original, tolerance = make_variant(kind, tmp_path)
    reference = _save(tmp_path / "original.png", Image.fromarray(original))
    got, want = load_image(path).astype(int), load_image(reference).astype(int)
    assert got.shape == (32, 32, 3)
    assert np.abs(got - want).mean() <= tolerance, kind
    result = cli("predict", reference, path, "-w", weights, "--json")
    assert result.exit_code == 0, result.output
    classes = [r["class"] for r in json.loads(result.stdout)["results"]]
    assert len(classes) == 2 and classes[0] == classes[1], classes


def test_mistakes_the_preprocessing_avoids_would_show(tmp_path: Path) -> None:
    """The originals are chosen so that clipping 16-bit, ignoring EXIF or alpha would change the arrays."""
    rgb, grey = scene(), scene(grey=True)
    ref = load_image(_save(tmp_path / "o.png", Image.fromarray(rgb))).astype(int)
    turned = load_image(_save(tmp_path / "t.png", Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)))
    assert np.abs(turned - ref).mean() > 20
    black_bg = load_image(_save(tmp_path / "b.png", Image.fromarray(_on_transparent(rgb)[..., :3])))
    assert np.abs(black_bg - ref).mean() > 50
    clipped = np.minimum(grey[..., 0].astype(np.uint16) * 257, 255).astype(np.uint8)
    assert np.abs(clipped.astype(int) - grey[..., 0]).mean() > 50


def test_preprocessing_crops_the_centre_square(tmp_path: Path) -> None:
    """A wide image keeps its centre square: a 96x32 image with red, green and blue thirds comes out all green."""
    a = np.zeros((32, 96, 3), np.uint8)
    a[:, :32, 0] = a[:, 32:64, 1] = a[:, 64:, 2] = 255
    out = load_image(_save(tmp_path / "wide.png", Image.fromarray(a)))
    assert (out[..., 1] == 255).all() and out[..., 0].max() == out[..., 2].max() == 0


def test_table_and_top_k(weights: Path, tmp_path: Path) -> None:
    """The table names file, class and probability and the next classes; --json has every probability."""
    for m in (20, 140, 240):
        Image.new("RGB", (40, 40), (m, m, m)).save(tmp_path / f"grey{m}.png")
    result = cli("predict", tmp_path, "-w", weights, "-k", "4")
    assert result.exit_code == 0, result.output
    assert "next 3" in result.stdout and "grey140.png" in result.stdout and "%" in result.stdout
    s = json.loads(cli("predict", tmp_path, "-w", weights, "-k", "4", "--json").stdout)
    assert s["class_names"] == list(CLASSES) and s["top_k"] == 4 and s["errors"] == []
    by_name = {Path(r["path"]).name: r for r in s["results"]}
    assert [by_name[f"grey{m}.png"]["class"] for m in (20, 140, 240)] == ["airplane", "dog", "truck"]
    for r in s["results"]:
        probs = [t["probability"] for t in r["top_k"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and r["probability"] == probs[0]
        assert len(r["probabilities"]) == 10 and abs(sum(r["probabilities"]) - 1) < 1e-4


def test_folders_are_searched_recursively_and_globs_expanded(weights: Path, tmp_path: Path) -> None:
    """A folder finds images at any depth (not other files); a quoted glob matches; a glob matching nothing is an error."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a" / "b" / "deep.png")
    Image.new("RGB", (32, 32), "black").save(tmp_path / "a" / "top.jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    s = json.loads(cli("predict", tmp_path / "a", "-w", weights, "--json").stdout)
    assert sorted(Path(r["path"]).name for r in s["results"]) == ["deep.png", "top.jpg"] and s["errors"] == []
    s = json.loads(cli("predict", f"{tmp_path}/a/**/*.png", "-w", weights, "--json").stdout)
    assert [Path(r["path"]).name for r in s["results"]] == ["deep.png"]
    result = cli("predict", f"{tmp_path}/a/*.gif", tmp_path / "a" / "top.jpg", "-w", weights)
    assert result.exit_code == 1 and "no files match" in result.stderr and "top.jpg" in result.stdout


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes that declare a width x height RGB PNG (a decompression bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
                     + chunk(b"IEND", b""))
    return path


def test_bad_inputs_are_reported_and_the_rest_predicted(weights: Path, tmp_path: Path) -> None:
    """Missing path, empty folder, non-image, truncated image and bombs: one error line each, the good file predicted, exit 1."""
    good = _save(tmp_path / "good.png", Image.fromarray(scene()))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    (tmp_path / "notes.png").write_text("this is text, not a picture")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = _save(tmp_path / "whole.png", Image.fromarray(noise)).read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    bomb = _png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    big = _png_header_only(tmp_path / "big.png", 12_000, 9_000)
    bad = {tmp_path / "missing.png": "no such file or folder", tmp_path / "empty": "no images in this folder",
           tmp_path / "notes.png": "not an image", tmp_path / "truncated.png": "truncated or corrupt",
           bomb: "refused before decoding", big: "12,000x9,000 = 108,000,000 pixels"}
    args = [tmp_path / "missing.png", good, tmp_path / "empty", tmp_path / "notes.png", tmp_path / "truncated.png",
            bomb, big]

    result = cli("predict", *args, "-w", weights, "--json")
    assert result.exit_code == 1
    s = json.loads(result.stdout)
    assert [r["path"] for r in s["results"]] == [str(good)]
    assert {e["path"]: e["error"] for e in s["errors"]}.keys() == {str(p) for p in bad}
    for e in s["errors"]:
        assert bad[Path(e["path"])] in e["error"], e

    result = cli("predict", *args, "-w", weights)
    assert result.exit_code == 1 and "good.png" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(bad) and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in result.output


def test_bomb_is_refused_by_its_header_in_milliseconds(tmp_path: Path) -> None:
    """A PNG declaring 400 megapixels is refused from its header, without decoding, in well under a second."""
    bomb = _png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    start = time.perf_counter()
    with pytest.raises(Exception, match=f"more than {MAX_PIXELS:,} pixels; refused before decoding"):
        load_image(bomb)
    assert time.perf_counter() - start < 0.5


def test_bad_weights_exit_2_before_reading_images(tmp_path: Path) -> None:
    """A broken weights file stops predict with one line and exit 2."""
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x80\x04\x95" + b"\0" * 64)  # the start of a pickle
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    result = cli("predict", tmp_path / "x.png", "-w", bad)
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "not a valid safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
