"""One image pipeline: a photo imported into a dataset and the same photo given to `predict` are
prepared by the same function, so training and prediction see the same pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarctl import data, images
from cifarctl.config import DownloadConfig
from cifarctl.progress import Reporter


def photo(kind: str, rng: np.random.Generator) -> bytes:
    """A non-square photo of the given kind, as file bytes."""
    pixels = rng.integers(0, 256, size=(48, 80, 4), dtype=np.uint8)
    buf = io.BytesIO()
    if kind == "rgba-png":
        Image.fromarray(pixels, "RGBA").save(buf, "PNG")
    elif kind == "exif-jpeg":
        im = Image.fromarray(pixels[..., :3], "RGB")
        exif = im.getexif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees on display
        im.save(buf, "JPEG", quality=90, exif=exif)
    elif kind == "palette-gif":
        Image.fromarray(pixels[..., :3], "RGB").convert("P").save(buf, "GIF")
    else:
        Image.fromarray(pixels[..., 0], "L").save(buf, "TIFF")
    return buf.getvalue()


KINDS = ["rgba-png", "exif-jpeg", "palette-gif", "grey-tiff"]
SUFFIX = {"rgba-png": ".png", "exif-jpeg": ".jpg", "palette-gif": ".gif", "grey-tiff": ".tif"}


def test_imported_and_predicted_pixels_are_identical(tmp_path: Path) -> None:
    """Alpha, EXIF orientation, palettes and greyscale, non-square: the cache holds exactly what predict reads."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    files = {}
    for split in ("train", "test"):
        for k, kind in enumerate(KINDS):
            path = root / split / f"class{k % 2}" / f"{kind}{SUFFIX[kind]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(photo(kind, rng))
            files[(split, kind)] = path
    summary = data.download(DownloadConfig(data_dir=tmp_path / "data", source=str(root)), Reporter())
    assert summary["converted"] == 2 * len(KINDS) and not summary["skipped"]
    ds = data.load_dataset(tmp_path / "data")
    for split in ("train", "test"):
        cached = {bytes(img.numpy().tobytes()) for img in ds.split(split).images}
        for kind in KINDS:
            predicted = images.load_image(files[(split, kind)])
            assert predicted.tobytes() in cached, (split, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_32x32_rgb(kind: str, tmp_path: Path) -> None:
    """Each kind of photo comes out as (32, 32, 3) uint8, flagged as converted."""
    path = tmp_path / f"x{SUFFIX[kind]}"
    path.write_bytes(photo(kind, np.random.default_rng(1)))
    array, converted = images.load_image_counted(path)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8 and converted
