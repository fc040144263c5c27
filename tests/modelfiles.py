"""Test helpers: weights files with a known decision rule, built by hand instead of trained."""

from __future__ import annotations

from pathlib import Path

import torch

from cifarctl.data import CLASSES
from cifarctl.models import build_model
from cifarctl.weights import save_weights

BUCKET = 255 / 10  # the default rule: class k for a mean brightness in [k * 25.5, (k + 1) * 25.5)


def brightness_weights(path: Path, centres: list[float] | None = None) -> Path:
    """Write a tutorial-net weights file that classifies by mean brightness (0..255): class k is
    the nearest of `centres` (default: the middles of ten equal buckets).

    With inputs x = 2p/255 - 1, conv1's first channel averages its 5x5 window and adds 1, so it
    carries v = 2m/255 for local brightness m; conv2 and fc1 average that again, fc2 copies it,
    and fc3 scores class k as 2*c_k*v - c_k^2 = c_k^2 - (v - c_k)^2 + v^2: the nearest centre wins.
    """
    centres = centres if centres is not None else [BUCKET * (k + 0.5) for k in range(10)]
    c = torch.tensor([2 * b / 255 for b in centres])  # centres in v units, (10,)
    model = build_model("tutorial", {"num_classes": 10})
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    state["conv1.weight"][0] = 1 / 75  # (6, 3, 5, 5): channel 0 = mean over 3x5x5 inputs
    state["conv1.bias"][0] = 1.0
    state["conv2.weight"][0, 0] = 1 / 25  # (16, 6, 5, 5): channel 0 = mean of conv1's channel 0
    state["fc1.weight"][0, :25] = 1 / 25  # (120, 400): the first 25 inputs are conv2's channel 0
    state["fc2.weight"][0, 0] = 1.0  # (84, 120)
    state["fc3.weight"][:, 0] = 2 * c  # (10, 84)
    state["fc3.bias"][:] = -c * c
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, state, {"model": "tutorial", "model_config": {"num_classes": 10},
                               "class_names": list(CLASSES), "mean": [0.5] * 3, "std": [0.5] * 3})
    return path


def brightness_class(m: float) -> int:
    """The class the default brightness rule gives a uniform image of brightness m."""
    return min(int(m // BUCKET), 9)
