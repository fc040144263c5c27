"""Shared fixtures: tiny generated datasets, never the real CIFAR-10."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cifarctl import data


def write_tiny_cache(data_dir: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """Write a valid dataset cache of random images whose class is visible in the pixels
    (a per-class mean colour), so that a few steps of training can learn something."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n, dtype=np.int64) % 10
        rng.shuffle(labels)
        base = (labels[:, None, None, None] * 25).astype(np.int16)
        noise = rng.integers(-20, 20, size=(n, 32, 32, 3))
        arrays[f"{split}_images"] = np.clip(base + noise, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    meta = {
        "format": data.CACHE_FORMAT,
        "format_version": data.FORMAT_VERSION,
        "class_names": json.dumps(list(data.CLASSES)),
        "source": "generated",
        "source_md5": "",
        "train_count": str(n_train),
        "test_count": str(n_test),
    }
    data._write_cache(data.cache_path(data_dir), arrays, meta)
    return data_dir


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """A data dir holding a tiny valid cache (200 train, 100 test images)."""
    return write_tiny_cache(tmp_path / "data")
