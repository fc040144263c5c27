"""Every option of every command as a dataclass, with all defaults in one visible block.

This module imports nothing heavy, so the CLI can build its help from it without torch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_BYTES = 170_498_071
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_BYTES = 169_001_437
DEFAULT_DATASET = "cifar10"
OFFICIAL_URLS = {"cifar10": CIFAR10_URL, "cifar100": CIFAR100_URL, "cifar100-coarse": CIFAR100_URL}
# A dataset name becomes a file name (DATA_DIR/<name>.safetensors): lower-case letters, digits,
# '.', '_' and '-', starting with a letter or digit, so no name can reach outside the data dir.
_DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MIN_CLASSES, MAX_CLASSES = 2, 1000


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


def env_number(name: str, default: float, kind: type = float) -> Any:
    """A positive number from environment variable `name`, else `default`; a bad value is a UsageError
    (the limits and deadlines of downloads and imports are set this way)."""
    from cifarctl.errors import UsageError

    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if not value > 0 or value == float("inf"):
        unit = "bytes" if kind is int else "seconds"
        raise UsageError(f"{name}={raw!r} is not a positive number of {unit}; set it to e.g. {kind(default)} "
                         "or unset it")
    return value


def _env_dataset() -> str:
    return os.environ.get("CIFARCTL_DATASET") or DEFAULT_DATASET


def check_dataset_name(name: str) -> str:
    """`name` if it can name a dataset; else a UsageError saying what a name may hold."""
    from cifarctl.errors import UsageError

    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name) or name.endswith("."):
        raise UsageError(f"dataset name {name!r} is not allowed; use 1 to 64 lower-case letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit")
    return name


@dataclass
class DownloadConfig:
    """Where CIFAR-10 comes from and where its tensor cache lives."""

    data_dir: Path = field(default_factory=lambda: _env_path("CIFARCTL_DATA_DIR", "data"))
    # None: the official archive. Given (option or env CIFARCTL_SOURCE), a cache built from another
    # source is rebuilt from this one.
    source: str | None = field(default_factory=lambda: os.environ.get("CIFARCTL_SOURCE") or None)
    md5: str | None = None  # expected md5 of an archive that is not byte-identical to the official one
    force: bool = False  # rebuild the cache even when a valid one exists
    dataset: str = field(default_factory=_env_dataset)  # the cache's name: DATA_DIR/<dataset>.safetensors
    test_split: float = 0.2  # share of each class held out as test, for a folder without train/ and test/
    split_seed: int = 0  # seed of that stratified split
    # Side of the square images an image folder is imported at (8..512); None: 32, or the size of
    # the cache there is. Given and different from the cache's, the cache is rebuilt.
    image_size: int | None = None

    @property
    def url_or_path(self) -> str:
        """The source to read: the one given, else the official archive's URL ('' for other names)."""
        return self.source or OFFICIAL_URLS.get(self.dataset, "")


class ModelName(str, Enum):
    """Networks in the model registry (cifarctl.models)."""

    tutorial = "tutorial"
    fast = "fast"
    resnet18 = "resnet18"


class Schedule(str, Enum):
    """Learning-rate schedule."""

    constant = "constant"
    onecycle = "onecycle"


class Flip(str, Enum):
    """Horizontal-flip augmentation."""

    none = "none"
    random = "random"
    alternate = "alternate"


class Precision(str, Enum):
    """Arithmetic precision of forward and backward passes; auto: bf16 where the hardware does it
    natively (CUDA, CPUs with AVX-512 BF16 or AMX), else fp32 (emulated bf16 is many times slower)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class TTA(str, Enum):
    """Test-time augmentation at evaluation."""

    none = "none"
    flip = "flip"
    flip_translate = "flip-translate"


class Normalization(str, Enum):
    """How pixels are scaled before the network."""

    tutorial = "tutorial"
    dataset = "dataset"


@dataclass
class TrainConfig:
    """Every option of `cifarctl train`. The defaults are the PyTorch tutorial's recipe."""

    model: str = "tutorial"
    batch_size: int = 4
    epochs: int = 2
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    bias_lr_scale: float = 1.0  # learning-rate multiplier for biases and BatchNorm shifts
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int | None = None  # None: a random seed, recorded in the run
    deterministic: bool = False  # deterministic kernels (slower on GPU); CPU runs are repeatable anyway
    log_every: int = 2000  # steps between running-loss lines (the tutorial prints every 2,000)
    nesterov: bool = False
    label_smoothing: float = 0.0
    schedule: str = "constant"  # constant | onecycle: linear warm-up to --lr, then linear decay to 0
    warmup_epochs: float = 0.0
    flip: str = "none"  # none | random | alternate (airbench: each image flipped every other epoch)
    crop_pad: int = 0  # random crops: translate by up to this many pixels (reflect padding); 0 = off
    cutout: int = 0  # zero a random square of this side per image; 0 = off
    lookahead: bool = False  # average the weights every 5 steps, more strongly late in the run (airbench)
    width: str | None = None  # channel widths of the `fast` model, e.g. "32,96,192"
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer stay float32) | auto
    channels_last: bool = False  # NHWC memory layout, faster for convolutions on CPU and GPU
    compile: bool = False  # torch.compile the model (pays only for long runs)
    tta: str = "none"  # test-time augmentation at evaluation: none | flip | flip-translate
    normalization: str = "tutorial"  # tutorial: mean = std = 0.5, inputs in [-1, 1]; dataset: CIFAR-10 statistics
    dist_timeout: float = 60.0  # seconds a process waits for the others (torchrun) before failing
    dataset: str = field(default_factory=_env_dataset)  # a dataset cached by `cifarctl download`
    val_split: float = 0.0  # share of each training class held out for validation (0: none, as the tutorial)
    patience: int | None = None  # stop after this many epochs without a better validation accuracy
    eval_every: int = 1  # score the test set every N epochs (0: only at the end); the end always is
    budget: float | None = None  # seconds for the whole run: epochs, width (fast: batch, lr, TTA) are planned to fit
    plan: dict[str, Any] | None = None  # what --budget chose (set by the planner, kept on resume)
    output_dir: Path | None = None  # None: runs/<model>-<timestamp>
    overwrite: bool = False  # allow -o to name a folder that already holds a run
    data_dir: Path = field(default_factory=lambda: _env_path("CIFARCTL_DATA_DIR", "data"))

    def validate(self) -> None:
        """Check every choice and range once, up front; raises UsageError naming the option."""
        from cifarctl.errors import UsageError

        for name, enum in (("model", ModelName), ("schedule", Schedule), ("flip", Flip), ("precision", Precision),
                           ("tta", TTA), ("normalization", Normalization)):
            allowed = [e.value for e in enum]
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name, (low, high) in _RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise UsageError(f"--{name.replace('_', '-')} must be a number from {low:g} to {high:g}, not {value!r}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, not {self.lr!r}")
        if self.warmup_epochs > self.epochs:
            raise UsageError(f"--warmup-epochs ({self.warmup_epochs:g}) cannot exceed --epochs ({self.epochs})")
        if self.width is not None:
            parse_widths(self.width, self.model)
        check_dataset_name(self.dataset)
        if self.budget is not None and self.model not in ("fast", "resnet18"):
            raise UsageError(f"--budget works with --model fast or resnet18, not {self.model}")
        if self.patience is not None and self.val_split == 0:
            raise UsageError("--patience needs a validation split: add --val-split, e.g. 0.1")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        out = asdict(self)
        for key in ("output_dir", "data_dir"):
            out[key] = None if out[key] is None else str(out[key])
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_json` output, ignoring fields this version does not know."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in obj.items() if k in known})
        cfg.output_dir = None if cfg.output_dir is None else Path(cfg.output_dir)
        cfg.data_dir = Path(cfg.data_dir)
        return cfg


# The ranges every numeric option must fall in. Values outside them cannot work (a learning rate of
# 1e308 overflows in the first step) or would take absurd resources (a batch of a billion images).
_RANGES: dict[str, tuple[float, float]] = {
    "batch_size": (1, 1 << 20),
    "epochs": (1, 100_000),
    "lr": (0, 1e4),
    "momentum": (0, 0.9999),
    "weight_decay": (0, 1),
    "bias_lr_scale": (0, 1e4),
    "seed": (0, 2**63 - 1),
    "log_every": (1, 1 << 40),
    "label_smoothing": (0, 1),
    "warmup_epochs": (0, 100_000),
    "crop_pad": (0, 16),
    "cutout": (0, 32),
    "dist_timeout": (1, 7 * 24 * 3600),
    "val_split": (0, 0.5),
    "patience": (1, 100_000),
    "eval_every": (0, 100_000),
    "budget": (1, 7 * 24 * 3600),
}
MAX_WIDTH = 4096  # channels per layer of --width: wider would not fit any machine this runs on


def parse_widths(text: str, model: str = "fast") -> list[int]:
    """"32,96,192" -> [32, 96, 192] for --model fast; raises UsageError for anything else."""
    from cifarctl.errors import UsageError

    if model != "fast":
        raise UsageError("--width applies to --model fast only")
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError as err:
        raise UsageError(f"--width takes comma-separated integers like 32,96,192, not {text!r}") from err
    if not 1 <= len(widths) <= 8 or not all(1 <= w <= MAX_WIDTH for w in widths):
        raise UsageError(f"--width takes 1 to 8 widths from 1 to {MAX_WIDTH}, not {text!r}")
    return widths


# Per-model recipes: the fields that differ from TrainConfig's defaults. Options given on the
# command line override these.
PRESETS: dict[str, dict[str, Any]] = {
    "tutorial": {},
    "fast": dict(batch_size=256, epochs=10, lr=0.35, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 bias_lr_scale=16.0, label_smoothing=0.2, schedule="onecycle", warmup_epochs=1.0, flip="alternate",
                 crop_pad=2, lookahead=True, width="32,96,192", precision="auto", channels_last=True,
                 tta="flip-translate", normalization="dataset", log_every=25, eval_every=0),
    "resnet18": dict(batch_size=128, epochs=30, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                     schedule="onecycle", warmup_epochs=1.0, flip="random", crop_pad=4, precision="auto",
                     channels_last=True, tta="flip", normalization="dataset", log_every=100),
}


def describe_presets() -> str:
    """One line per model naming the settings its recipe changes, for --help and the docs."""
    lines = []
    for model, values in PRESETS.items():
        text = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in values.items()) or "the PyTorch tutorial's defaults"
        lines.append(f"{model}: {text}")
    return "\n\n".join(lines)


def train_config(model: str = "tutorial", **overrides: Any) -> TrainConfig:
    """The preset for `model` with explicit `overrides` (None values are ignored) applied."""
    values = {**PRESETS.get(model, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(model=model, **values)


class SplitName(str, Enum):
    """A part of CIFAR-10: the 50,000 training or the 10,000 test images."""

    train = "train"
    test = "test"


@dataclass
class EvaluateConfig:
    """Every option of `cifarctl evaluate`."""

    weights: Path = Path("runs/latest/weights.safetensors")
    dataset: str | None = field(default_factory=lambda: os.environ.get("CIFARCTL_DATASET") or None)  # None: the weights'
    split: str = "test"
    batch_size: int | None = None  # images per forward pass (None: 128 on a CPU, 1000 on a GPU); memory and speed only
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    confusion: bool = False  # also write confusion.png
    output_dir: Path | None = None  # where confusion.png goes; None: the weights file's folder
    data_dir: Path = field(default_factory=lambda: _env_path("CIFARCTL_DATA_DIR", "data"))


@dataclass
class PredictConfig:
    """Every option of `cifarctl predict`."""

    paths: list[str] = field(default_factory=list)  # files, folders (searched recursively) or globs
    weights: Path = Path("runs/latest/weights.safetensors")
    top_k: int = 3
    batch_size: int = 256  # images decoded and classified together
    device: str = "auto"


@dataclass
class ShowBatchConfig:
    """Every option of `cifarctl show-batch`."""

    split: str = "train"
    dataset: str = field(default_factory=_env_dataset)
    n: int = 16
    seed: int | None = None  # None: a fresh one, printed so the same batch can be shown again
    out: Path = Path("grid.png")
    weights: Path | None = None  # also show each image's predicted class
    scale: int = 4  # each 32x32 image is drawn scale x scale times larger in the PNG
    data_dir: Path = field(default_factory=lambda: _env_path("CIFARCTL_DATA_DIR", "data"))
