"""Image files to model input: finding them, refusing hostile ones, and turning any photo
Pillow reads into the 32x32 RGB uint8 array a CIFAR-10 model expects.

No torch here: `predict` batches the arrays this module returns.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cifarctl.errors import CifarctlError
from cifarctl.fsutil import kind_of

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIZE = 32
# Declared width*height above this is refused from the header, before any pixel is decoded: a few
# hundred bytes of PNG can declare gigabytes of pixels. 100 MP still admits any real camera photo.
MAX_PIXELS = 100_000_000
# JPEGs are decoded at a power-of-two reduction no smaller than this many times the final size
# (DCT scaling): large photos become several times cheaper to read, with margin for the antialiasing.
_DRAFT_FACTOR = 4
_GLOB_CHARS = set("*?[")


class ImageError(CifarctlError):
    """One input file could not be used; the message says why."""


@dataclass
class PathError:
    """A command-line path or file that produced no image, and why."""

    path: str
    error: str


def collect_images(args: list[str]) -> tuple[list[Path], list[PathError]]:
    """Expand files, folders (searched recursively for IMAGE_SUFFIXES by `walk_files`) and glob
    patterns into a list of files, each once, in the order given. Returns (files, problems)."""
    files: list[Path] = []
    problems: list[PathError] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    def add_folder(folder: Path, arg: str) -> None:
        found, bad = walk_files(folder)
        problems.extend(bad)
        if not found and not bad:
            problems.append(PathError(arg, f"no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})"))
        for f in found:
            add(f)

    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():  # a folder named on the command line is searched even through a symlink
            add_folder(path, arg)
        elif os.path.lexists(path):  # named explicitly: any suffix is tried, so a non-image gets a clear error
            reason = not_regular_reason(path)
            if reason:
                problems.append(PathError(arg, reason))
            else:
                add(path)
        elif _GLOB_CHARS & set(arg):
            matches = _glob(arg)
            if not matches:
                problems.append(PathError(arg, "no files match this pattern"))
            for match in matches:
                if match.is_dir():
                    add_folder(match, str(match))
                elif reason := not_regular_reason(match):
                    problems.append(PathError(str(match), reason))
                else:
                    add(match)
        else:
            problems.append(PathError(arg, "no such file or folder"))
    return files, problems


def _glob(pattern: str) -> list[Path]:
    """Sorted matches of a glob pattern. glob.glob's `**` follows symlinked folders, so that a link
    loop recurses until the path is too long, once per link; pathlib's `**` does not follow them."""
    path = Path(pattern).expanduser()
    if "**" not in pattern:
        return sorted(map(Path, glob.glob(str(path))))  # fixed depth: one level per component
    parts = path.parts
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    base = Path(*parts[:first]) if first else Path()
    rest = parts[first:]
    try:
        matches = list(base.glob("/".join(rest)))
    except (OSError, ValueError):
        return []
    # Like glob.glob, wildcards skip hidden names unless the pattern itself names one.
    if not any(part.startswith(".") for part in rest):
        matches = [m for m in matches if not any(p.startswith(".") for p in m.relative_to(base).parts)]
    return sorted(matches)


def not_regular_reason(path: Path | str) -> str | None:
    """None when `path` is a regular file or a symlink to one, else why it is not (never opens it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
        if os.path.islink(path):
            return f"a broken symlink (to {os.readlink(path)})"
        if err.errno == errno.ENOENT:
            return "no such file or folder"
        return f"cannot read: {err.strerror or err}"
    return None if stat.S_ISREG(mode) else f"not a regular file: {kind_of(mode)}"


def walk_files(folder: Path | str,
               suffixes: Iterable[str] | None = IMAGE_SUFFIXES) -> tuple[list[Path], list[PathError]]:
    """Regular files under `folder` whose suffix (any case) is in `suffixes` (None: any), sorted,
    and a PathError for each entry with such a suffix that is not one, and for each unlistable folder.

    Never hangs and never opens anything but folders: subfolders are found by lstat and symlinked
    folders are not descended (like `find` without -L), so a link loop cannot recurse; symlinks to
    regular files are kept; FIFOs, sockets, devices, broken links and links to folders are reported.
    """
    wanted = None if suffixes is None else {s.lower() for s in suffixes}
    files: list[Path] = []
    problems: list[PathError] = []
    pending = [Path(folder)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = list(listing)
        except OSError as err:
            problems.append(PathError(str(current), f"cannot list this folder: {err.strerror or err}"))
            continue
        for entry in entries:
            path = current / entry.name
            try:
                real_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                real_dir = False
            if real_dir:
                pending.append(path)
            elif wanted is None or path.suffix.lower() in wanted:
                reason = not_regular_reason(path)
                if reason:
                    problems.append(PathError(str(path), reason))
                else:
                    files.append(path)
    problems.sort(key=lambda p: p.path)
    return sorted(files), problems


def load_image(path: Path | str, size: int = SIZE) -> np.ndarray:
    """Read one image file as (size, size, 3) uint8 RGB (CIFAR: 32); raises ImageError naming the problem.

    Steps: refuse anything but a regular file before opening it (a FIFO would block); refuse more
    than MAX_PIXELS by the header; first frame of animations; EXIF orientation; 16-bit scaled (not
    clipped) to 8 bits; palette, greyscale and CMYK to RGB; alpha composited on white; centre-cropped
    to a square; resized to size x size with Lanczos (antialiased) resampling.
    """
    return load_image_counted(path, size)[0]


def load_image_counted(path: Path | str, size: int = SIZE) -> tuple[np.ndarray, bool]:
    """`load_image`, plus whether the file was anything but size x size RGB (so it was converted): the
    one pipeline that dataset imports and `predict` share, so training and prediction see the
    same pixels for the same file."""
    with open_regular(path) as f:
        return _decode(f, size)


def open_regular(path: Path | str) -> BinaryIO:
    """Open `path` for binary reading only if it is a regular file or a symlink to one; else ImageError.

    Checked by os.stat before opening (opening a FIFO blocks, a device may have side effects) and by
    fstat after an O_NONBLOCK open, so that a file swapped for a FIFO in between cannot block either.
    """
    reason = not_regular_reason(path)
    if reason:
        raise ImageError(reason)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from err
    f = open(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise ImageError(f"not a regular file: {kind_of(mode)}")
    return f


def _decode(f: BinaryIO, size: int) -> tuple[np.ndarray, bool]:
    """An open image file -> ((size, size, 3) uint8 RGB, converted?), every failure an ImageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(f)
    except Image.DecompressionBombError as err:  # Pillow's own hard limit, twice its warning level
        raise ImageError(f"declares more than {MAX_PIXELS:,} pixels; refused before decoding "
                         "(a decompression bomb?); shrink it first") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"not an image (or not one of {', '.join(s[1:] for s in IMAGE_SUFFIXES)})") from err
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from err
    except Exception as err:  # e.g. ValueError for text chunks that decompress too large, while the header is read
        raise ImageError(f"corrupt or hostile image header ({type(err).__name__}: {err})") from err
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"declares {width:,}x{height:,} = {width * height:,} pixels, more than the "
                             f"{MAX_PIXELS:,} allowed; refused before decoding (a decompression bomb?); "
                             "shrink it first")
        if not width or not height:
            raise ImageError("has no pixels (0 width or height)")
        converted = im.size != (size, size) or im.mode != "RGB"
        try:
            return preprocess(im, size), converted
        except ImageError:
            raise
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for damaged data
            raise ImageError(f"truncated or corrupt image ({type(err).__name__}: {err})") from err


def preprocess(im: Any, size: int = SIZE) -> np.ndarray:
    """An opened PIL image -> (size, size, 3) uint8 RGB, by the steps listed in `load_image`."""
    from PIL import Image, ImageOps

    draft = _DRAFT_FACTOR * size
    if im.format == "JPEG" and min(im.size) >= 2 * draft:
        im.draft(None, (draft, draft))
    im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    width, height = im.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    im = im.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
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


def load_images(paths: list[Path], size: int = SIZE) -> tuple[np.ndarray, list[int], list[PathError]]:
    """Read many files: (k, size, size, 3) uint8 for the k that worked, their indices in `paths`,
    and a PathError for each of the others."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def attempt(path: Path) -> np.ndarray | PathError:
        try:
            return load_image(path, size)
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
    images = np.stack([outcomes[i] for i in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
    return images, ok, problems
