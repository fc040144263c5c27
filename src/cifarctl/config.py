"""Every option of every command as a dataclass, with all defaults in one visible block.

This module imports nothing heavy, so the CLI can build its help from it without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

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
