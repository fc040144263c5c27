"""The library leaves the process as it found it: torch threads, denormal flushing, determinism
flags and the global random generators are restored after `train()` returns or fails."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarctl.config import train_config
from cifarctl.device import flush_denormal_enabled
from cifarctl.errors import CifarctlError
from cifarctl.progress import Reporter
from cifarctl.train import train


def snapshot() -> tuple:
    return (torch.get_num_threads(), flush_denormal_enabled(), torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.benchmark, torch.get_rng_state().clone(), np.random.get_state()[1].copy(),
            random.getstate())


def assert_same(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    assert torch.equal(a[4], b[4]) and np.array_equal(a[5], b[5]) and a[6] == b[6]


@pytest.mark.parametrize("model, extra", [("tutorial", {}), ("fast", {"width": "8,8,8", "batch_size": 32})])
def test_train_restores_process_settings(tiny_data_dir: Path, tmp_path: Path, model: str, extra: dict) -> None:
    """After train() (fused tutorial step on 1 thread, or fast with denormal flushing) the settings are as before."""
    torch.set_num_threads(2)
    torch.set_flush_denormal(False)
    before = snapshot()
    cfg = train_config(model, epochs=1, seed=0, deterministic=True, data_dir=tiny_data_dir,
                       output_dir=tmp_path / "run", **extra)
    train(cfg, Reporter())
    assert_same(before, snapshot())


def test_settings_are_restored_when_training_fails(tmp_path: Path, monkeypatch) -> None:
    """A run that fails (no dataset) also leaves the settings as they were."""
    monkeypatch.setenv("CIFARCTL_SOURCE", str(tmp_path / "no-such-source"))
    before = snapshot()
    cfg = train_config("tutorial", epochs=1, seed=0, deterministic=True, data_dir=tmp_path / "nothing",
                       output_dir=tmp_path / "run")
    with pytest.raises(CifarctlError):
        train(cfg, Reporter())
    assert_same(before, snapshot())
