"""Image files to model input: finding them, refusing hostile ones, and turning any photo
Pillow reads into the 32x32 RGB uint8 array a CIFAR-10 model expects.

No torch here: `predict` batches the arrays this module returns.
"""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarctl.errors import CifarctlError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIZE = 32
# Declared width*height above this is refused from the header, before any pixel is decoded: a few
# hundred bytes of PNG can declare gigabytes of pixels. 100 MP still admits any real camera photo.
MAX_PIXELS = 100_000_000
# JPEGs are decoded at a power-of-two reduction no smaller than this (DCT scaling), which makes
# large photos several times cheaper to read and is still 4x the final size for the antialiasing.
_DRAFT_SIZE = (4 * SIZE, 4 * SIZE)
_GLOB_CHARS = set("*?[")


class ImageError(CifarctlError):
    """One input file could not be used; the message says why."""


@dataclass
class PathError:
    """A command-line path or file that produced no image, and why."""

    path: str
    error: str


def collect_images(args: list[str]) -> tuple[list[Path], list[PathError]]:
    """Expand files, folders (searched recursively for IMAGE_SUFFIXES) and glob patterns into a
    list of files, each once, in the order given. Returns (files, problems)."""
    files: list[Path] = []
    problems: list[PathError] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            found = _images_under(path)
            if not found:
                problems.append(PathError(arg, f"no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})"))
            for f in found:
                add(f)
        elif path.is_file():
            add(path)  # named explicitly: any suffix is tried, so a non-image gets a clear error
        elif _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                problems.append(PathError(arg, "no files match this pattern"))
            for match in map(Path, matches):
                for f in (_images_under(match) if match.is_dir() else [match]):
                    add(f)
        else:
            problems.append(PathError(arg, "no such file or folder"))
    return files, problems


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image(path: Path | str) -> np.ndarray:
    """Read one image file as (32, 32, 3) uint8 RGB; raises ImageError naming the problem.

    Steps: refuse more than MAX_PIXELS by the header; first frame of animations; EXIF orientation;
    16-bit scaled (not clipped) to 8 bits; palette, greyscale and CMYK to RGB; alpha composited on
    white; centre-cropped to a square; resized to 32x32 with Lanczos (antialiased) resampling.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
    except Image.DecompressionBombError as err:  # Pillow's own hard limit, twice its warning level
        raise ImageError(f"declares more than {MAX_PIXELS:,} pixels; refused before decoding "
                         "(a decompression bomb?); shrink it first") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"not an image (or not one of {', '.join(s[1:] for s in IMAGE_SUFFIXES)})") from err
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from err
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"declares {width:,}x{height:,} = {width * height:,} pixels, more than the "
                             f"{MAX_PIXELS:,} allowed; refused before decoding (a decompression bomb?); "
                             "shrink it first")
        if not width or not height:
            raise ImageError("has no pixels (0 width or height)")
        try:
            return preprocess(im)
        except ImageError:
            raise
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for damaged data
            raise ImageError(f"truncated or corrupt image ({type(err).__name__}: {err})") from err


def preprocess(im: Any) -> np.ndarray:
    """An opened PIL image -> (32, 32, 3) uint8 RGB, by the steps listed in `load_image`."""
    from PIL import Image, ImageOps

    if im.format == "JPEG" and min(im.size) >= 2 * _DRAFT_SIZE[0]:
        im.draft(None, _DRAFT_SIZE)
    im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    width, height = im.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    im = im.resize((SIZE, SIZE), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    return np.asarray(im, dtype=np.uint8)


def _to_rgb(im: Any) -> Any:
    """Any Pillow mode -> 8-bit RGB without alpha."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float32)
        # 16-bit data spans 0..65535: divide by 257 so that 65535 -> 255. Mode "I" is also used
        # for 8-bit data stored wide, so it is scaled only when it holds values beyond 8 bits.
        if im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = a * 255 if a.max() <= 1 else a  # float images are usually 0..1
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_images(paths: list[Path]) -> tuple[np.ndarray, list[int], list[PathError]]:
    """Read many files: (k, 32, 32, 3) uint8 for the k that worked, their indices in `paths`,
    and a PathError for each of the others."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def attempt(path: Path) -> np.ndarray | PathError:
        try:
            return load_image(path)
        except ImageError as err:
            return PathError(str(path), str(err))

    # Pillow releases the GIL while it decodes and resamples, so threads overlap file reads and
    # pixel work without the start-up cost of processes.
    workers = min(8, 2 * (os.cpu_count() or 1), max(len(paths), 1))
    with warnings.catch_warnings():
        # Pillow warns above its own limit; MAX_PIXELS decides instead, with an error per file.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(workers) as pool:
            outcomes = list(pool.map(attempt, paths))
    ok = [i for i, o in enumerate(outcomes) if not isinstance(o, PathError)]
    problems = [o for o in outcomes if isinstance(o, PathError)]
    images = np.stack([outcomes[i] for i in ok]) if ok else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, ok, problems
