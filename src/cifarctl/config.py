"""Every option of every command as a dataclass, with all defaults in one visible block.

This module imports nothing heavy, so the CLI can build its help from it without torch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_BYTES = 170_498_071


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


@dataclass
class DownloadConfig:
    """Where CIFAR-10 comes from and where its tensor cache lives."""

    data_dir: Path = field(default_factory=lambda: _env_path("CIFARCTL_DATA_DIR", "data"))
    source: str = field(default_factory=lambda: os.environ.get("CIFARCTL_SOURCE") or CIFAR10_URL)
    md5: str | None = None  # expected md5 of an archive that is not byte-identical to the official one
    force: bool = False  # rebuild the cache even when a valid one exists


class Device(str, Enum):
    """Hardware to run on; `auto` picks CUDA, then MPS, then the CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


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
    """Arithmetic precision of forward and backward passes."""

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
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer stay float32)
    channels_last: bool = False  # NHWC memory layout, faster for convolutions on CPU and GPU
    compile: bool = False  # torch.compile the model (pays only for long runs)
    tta: str = "none"  # test-time augmentation at evaluation: none | flip | flip-translate
    normalization: str = "tutorial"  # tutorial: mean = std = 0.5, inputs in [-1, 1]; dataset: CIFAR-10 statistics
    dist_timeout: float = 60.0  # seconds a process waits for the others (torchrun) before failing
    output_dir: Path | None = None  # None: runs/<model>-<timestamp>
    data_dir: Path = field(default_factory=lambda: _env_path("CIFARCTL_DATA_DIR", "data"))

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


# Per-model recipes: the fields that differ from TrainConfig's defaults. Options given on the
# command line override these.
PRESETS: dict[str, dict[str, Any]] = {
    "tutorial": {},
    "fast": dict(batch_size=256, epochs=10, lr=0.35, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 bias_lr_scale=16.0, label_smoothing=0.2, schedule="onecycle", warmup_epochs=1.0, flip="alternate",
                 crop_pad=2, lookahead=True, width="32,96,192", precision="bf16", channels_last=True,
                 tta="flip-translate", normalization="dataset", log_every=25),
    "resnet18": dict(batch_size=128, epochs=30, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                     schedule="onecycle", warmup_epochs=1.0, flip="random", crop_pad=4, precision="bf16",
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
    split: str = "test"
    batch_size: int = 1000  # images per forward pass; only memory and speed depend on it
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
    n: int = 16
    seed: int | None = None  # None: a fresh one, printed so the same batch can be shown again
    out: Path = Path("grid.png")
    weights: Path | None = None  # also show each image's predicted class
    scale: int = 4  # each 32x32 image is drawn scale x scale times larger in the PNG
    data_dir: Path = field(default_factory=lambda: _env_path("CIFARCTL_DATA_DIR", "data"))
