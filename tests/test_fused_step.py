"""The hand-written CPU step of the tutorial recipe (fast_tutorial.py) against autograd + torch.optim.SGD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cifarctl import data
from cifarctl.cli import app
from cifarctl.fast_tutorial import TutorialSGDStep
from cifarctl.models import build_model
from cifarctl.weights import load_weights

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def _twins(classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two tutorial nets with the same random initial weights."""
    torch.manual_seed(classes)
    a = build_model("tutorial", {"num_classes": classes})
    b = build_model("tutorial", {"num_classes": classes})
    b.load_state_dict(a.state_dict())
    return a, b


def _batches(classes: int, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random inputs in the tutorial's [-1, 1] pixel range and random labels, one batch per size."""
    g = torch.Generator().manual_seed(100 + classes)
    return [(torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, classes, (n,), generator=g))
            for n in sizes]


@pytest.mark.parametrize("classes", [10, 3, 11])
def test_fused_step_matches_autograd_and_sgd(classes: int) -> None:
    """200 fused steps at batch 4 and an odd last batch of 3 give the losses and weights of plain autograd + SGD."""
    fused_model, ref_model = _twins(classes)
    fused = TutorialSGDStep(fused_model, LR, MOMENTUM, WEIGHT_DECAY)
    opt = torch.optim.SGD(ref_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in training: the fused step runs on one thread
    try:
        for x, y in _batches(classes, [4] * 200 + [3]):
            loss = F.cross_entropy(ref_model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert fused(x, y).item() == pytest.approx(loss.item(), abs=1e-5)
    finally:
        torch.set_num_threads(threads)
    for (name, p), q in zip(fused_model.named_parameters(), ref_model.parameters()):
        assert (p - q).abs().max().item() < 1e-5, name
    moved = sum((p - q).abs().sum().item() for p, q in zip(ref_model.parameters(), _twins(classes)[0].parameters()))
    assert moved > 1.0  # the comparison is between weights that training changed, not two copies of the start


def test_fused_step_refuses_another_network() -> None:
    """A model other than the tutorial LeNet is refused up front rather than trained wrongly."""
    with pytest.raises(ValueError, match="tutorial LeNet"):
        TutorialSGDStep(build_model("fast", {"widths": [8, 8, 8], "stem": 8}), LR, MOMENTUM)


def _write_cache(data_dir: Path, names: list[str], n_train: int = 60, n_test: int = 30) -> Path:
    """A valid dataset cache with classes `names`, each a distinct brightness."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n, dtype=np.int64) % len(names)
        base = labels[:, None, None, None] * (200 // len(names)) + rng.integers(0, 40, size=(n, 32, 32, 3))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = base.astype(np.uint8), labels
    meta = {"format": data.CACHE_FORMAT, "format_version": data.FORMAT_VERSION, "class_names": json.dumps(names),
            "source": "generated", "source_md5": "", "train_count": str(n_train), "test_count": str(n_test)}
    data._write_cache(data.cache_path(data_dir), arrays, meta)
    return data_dir


@pytest.mark.parametrize("names", [["cat", "dog", "fox"], [f"c{i}" for i in range(11)]], ids=["3", "11"])
def test_default_recipe_trains_on_any_class_count(names: list[str], tmp_path: Path) -> None:
    """`cifarctl train` with the tutorial defaults (the fused step) runs on a dataset of 3 or 11 classes."""
    data_dir = _write_cache(tmp_path / "data", names)
    result = CliRunner().invoke(app, ["train", "--data-dir", str(data_dir), "--epochs", "1", "--seed", "0",
                                      "-o", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    weights = load_weights(tmp_path / "run" / "weights.safetensors")
    assert weights.class_names == names and weights.model.fc3.out_features == len(names)
