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


@dataclass
class TrainConfig:
    """Every option of `cifarctl train`. The defaults are the PyTorch tutorial's recipe."""

    model: str = "tutorial"
    batch_size: int = 4
    epochs: int = 2
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int | None = None  # None: a random seed, recorded in the run
    deterministic: bool = False  # deterministic kernels (slower on GPU); CPU runs are repeatable anyway
    log_every: int = 2000  # steps between running-loss lines (the tutorial prints every 2,000)
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
}


def train_config(model: str = "tutorial", **overrides: Any) -> TrainConfig:
    """The preset for `model` with explicit `overrides` (None values are ignored) applied."""
    values = {**PRESETS.get(model, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(model=model, **values)
