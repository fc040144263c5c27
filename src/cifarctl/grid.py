"""`show-batch`: a random batch of the dataset as a labelled PNG grid and as images in the
terminal, optionally with a model's predictions."""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from cifarctl import fsutil
from cifarctl.config import DownloadConfig, ShowBatchConfig
from cifarctl.errors import CifarctlError, UsageError
from cifarctl.progress import Reporter

SIZE = 32
PAD = 6  # pixels of white around each image in the PNG
LINE = 16  # pixels per label line
FONT_PX = 13
MAX_N = 1024
BLACK, GREEN, RED, GREY = (0, 0, 0), (0, 128, 0), (200, 0, 0), (90, 90, 90)
_RICH_STYLE = {BLACK: "", GREEN: "green", RED: "bold red", GREY: "dim"}  # the PNG's label colours in a terminal


@dataclass
class Batch:
    """The images shown: (n, 32, 32, 3) uint8, their true and (with weights) predicted class names,
    and the JSON-able summary the command prints."""

    images: np.ndarray
    labels: list[str]
    predicted: list[str] | None
    summary: dict[str, Any]


def grid_shape(n: int) -> tuple[int, int]:
    """(columns, rows) of the grid: as square as possible, filled row by row."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return cols, max(1, math.ceil(n / cols))


def grid_size(n: int, scale: int, with_predictions: bool, size: int = SIZE) -> tuple[int, int]:
    """Pixel (width, height) of the PNG for n images of size x size: each tile is the image scaled
    up, PAD on every side, and one label line (two with predictions) under it."""
    cols, rows = grid_shape(n)
    lines = 2 if with_predictions else 1
    return cols * (size * scale + 2 * PAD), rows * (size * scale + lines * LINE + 2 * PAD)


def show_batch(cfg: ShowBatchConfig, reporter: Reporter) -> Batch:
    """Draw `cfg.n` random images of a split (reproducible with `cfg.seed`), write the grid PNG to
    `cfg.out`, and with `cfg.weights` classify them."""
    import torch

    from cifarctl.data import ensure_dataset
    from cifarctl.metrics import predict_logits
    from cifarctl.rundir import weights_file
    from cifarctl.weights import load_weights

    if not 1 <= cfg.n <= MAX_N:
        raise UsageError(f"-n must be between 1 and {MAX_N}")
    if cfg.scale < 1:
        raise UsageError("--scale must be at least 1")
    fsutil.output_target(cfg.out)  # a folder or FIFO in the way is refused before any work
    weights_path = weights_file(cfg.weights) if cfg.weights is not None else None
    weights = load_weights(weights_path) if weights_path is not None else None  # bad files fail before any work
    ds = ensure_dataset(DownloadConfig(data_dir=cfg.data_dir, dataset=cfg.dataset), reporter)
    split = ds.split(cfg.split)
    if cfg.n > len(split):
        raise UsageError(f"-n {cfg.n} is more than the {len(split):,} images in the {cfg.split} split")
    seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
    idx = np.random.default_rng(seed).choice(len(split), cfg.n, replace=False)
    images = split.images[torch.as_tensor(idx)].numpy()  # (n, S, S, 3) uint8
    labels = [ds.class_names[i] for i in split.labels[torch.as_tensor(idx)].tolist()]
    predicted = None
    if weights is not None:
        from cifarctl.evaluation import check_image_size

        check_image_size(weights_path, weights.image_size, images)
        predicted = [weights.class_names[i] for i in predict_logits(weights, images).argmax(1).tolist()]
    grid = render_grid(images, labels, predicted, cfg.scale)
    with fsutil.atomic_path(cfg.out) as tmp:
        grid.save(tmp, format="PNG")
    summary = {
        "out": str(cfg.out),
        "size": list(grid.size),
        "split": cfg.split,
        "seed": seed,
        "indices": idx.tolist(),
        "labels": labels,
        "predicted": predicted,
        "correct": None if predicted is None else sum(p == t for p, t in zip(predicted, labels)),
        "weights": None if weights_path is None else str(weights_path),
    }
    return Batch(images, labels, predicted, summary)


def _font(px: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(px)
    except (TypeError, OSError):  # Pillow built without FreeType: the small bitmap font
        return ImageFont.load_default()


def _label_lines(label: str, predicted: str | None) -> list[tuple[str, tuple[int, int, int]]]:
    if predicted is None:
        return [(label, BLACK)]
    return [(f"pred: {predicted}", GREEN if predicted == label else RED), (f"true: {label}", GREY)]


def render_grid(images: np.ndarray, labels: list[str], predicted: list[str] | None = None,
                scale: int = 4) -> Any:
    """A PIL image of the batch: each (S, S, 3) image scaled up `scale` times without smoothing
    (so the pixels stay visible), its class under it; with predictions, the predicted class in
    green when right, in red with a red frame when wrong, and the true class under it."""
    from PIL import Image, ImageDraw

    n = len(images)
    cols, rows = grid_shape(n)
    width, height = grid_size(n, scale, predicted is not None, images.shape[1])
    side = images.shape[1] * scale
    tile_w, tile_h = width // cols, height // rows
    canvas = Image.fromarray(_tiles(images, scale, cols, tile_h - side - 2 * PAD))
    draw = ImageDraw.Draw(canvas)
    font = _font(FONT_PX)
    for i in range(n):
        x0, y0 = (i % cols) * tile_w, (i // cols) * tile_h
        guess = None if predicted is None else predicted[i]
        if guess is not None and guess != labels[i]:
            draw.rectangle((x0 + PAD - 3, y0 + PAD - 3, x0 + PAD + side + 2, y0 + PAD + side + 2), outline=RED, width=3)
        for line, (text, colour) in enumerate(_label_lines(labels[i], guess)):
            text_w = draw.textlength(text, font=font)
            draw.text((x0 + (tile_w - text_w) / 2, y0 + PAD + side + 2 + line * LINE), text, fill=colour, font=font)
    return canvas


def _tiles(images: np.ndarray, scale: int, cols: int, label_px: int) -> np.ndarray:
    """The images laid out by torchvision's make_grid: each (S, S, 3) image magnified `scale`
    times by repeating pixels (no smoothing), a white band of `label_px` under it for its labels,
    and PAD of white around every tile. Returns (H, W, 3) uint8 of grid_size()."""
    import torch

    make_grid = _make_grid()
    x = torch.as_tensor(images).permute(0, 3, 1, 2)  # (n, 3, S, S) uint8
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    x = torch.nn.functional.pad(x, (0, 0, 0, label_px), value=255)
    if len(x) == 1:  # make_grid returns a single image as it is, without padding
        grid = torch.nn.functional.pad(x[0], (PAD,) * 4, value=255)
    else:
        # make_grid puts `padding` between tiles and around the grid; 2 * PAD between and PAD at
        # the edges is the layout grid_size() describes, so the outer PAD is cut off again.
        grid = make_grid(x, nrow=cols, padding=2 * PAD, pad_value=255)[:, PAD:-PAD, PAD:-PAD]
    return grid.permute(1, 2, 0).contiguous().numpy()


def _make_grid():
    """torchvision's make_grid, or one line naming the fix when torchvision cannot load: a wheel
    built for another torch (PyPI's CUDA torchvision beside a CPU-only torch fails with
    "operator torchvision::nms does not exist")."""
    import torch

    try:
        from torchvision.utils import make_grid
    except (ImportError, RuntimeError, OSError) as err:
        raise CifarctlError(
            f"torchvision {_version('torchvision')} does not load with torch {torch.__version__} "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); install the matching pair from "
            "one index, e.g. pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu") from err
    return make_grid


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def preview_text(batch: Batch, width: int, color_system: str | None) -> str:
    """`preview` rendered to the characters and escape codes for a terminal `width` cells wide.

    Rendered in full before anything is printed, so that a terminal textual-image cannot handle
    (some report a size of 0x0) costs the preview, not a half-drawn screen or the command.
    """
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system=color_system, width=width, legacy_windows=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # textual-image 0.12 uses Image.getdata
            console.print(preview(batch, width))
    except Exception as err:  # textual-image's terminal queries raise several types
        raise CifarctlError(f"no image preview in this terminal ({type(err).__name__}: {err})") from err
    return buf.getvalue()


def preview(batch: Batch, width: int) -> Any:
    """A Rich renderable of the batch for a terminal `width` cells wide: each image with its label
    under it, as real pixels where the terminal speaks a graphics protocol (Kitty, Sixel), else as
    truecolor half blocks, one cell per pixel column and two pixel rows per cell (32x16 cells)."""
    from PIL import Image
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    from textual_image import renderable  # asks the terminal what it can draw

    graphics = renderable.Image not in (renderable.HalfcellImage, renderable.UnicodeImage)
    cols = max(1, (width + 1) // (SIZE + 1))
    table = Table.grid(padding=(0, 1, 1, 0))
    for _ in range(min(cols, len(batch.images))):
        table.add_column(width=SIZE, justify="center")
    cells = []
    for i, image in enumerate(batch.images):
        pil = Image.fromarray(image)
        if graphics:
            # The terminal scales the picture to the cells; nearest-neighbour keeps its pixels sharp.
            img = renderable.Image(pil.resize((SIZE * 8, SIZE * 8), Image.Resampling.NEAREST), width=SIZE,
                                   height="auto")
        else:
            img = renderable.HalfcellImage(pil, width=SIZE, height=SIZE // 2)
        guess = None if batch.predicted is None else batch.predicted[i]
        texts = [Text(t, style=_RICH_STYLE[c], justify="center", overflow="ellipsis", no_wrap=True)
                 for t, c in _label_lines(batch.labels[i], guess)]
        cells.append(Group(img, *texts))
    for start in range(0, len(cells), cols):
        table.add_row(*cells[start:start + cols])
    return table

