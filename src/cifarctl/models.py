"""The model registry: every network is built by name from a JSON-able config, so that a
weights file alone is enough to rebuild it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarctl.errors import UsageError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Add a model constructor to the registry under `name`."""

    def wrap(ctor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ctor
        return ctor

    return wrap


def model_names() -> list[str]:
    """Names of all registered models."""
    return sorted(_REGISTRY)


def build_model(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Build model `name` from its config (keyword arguments of its constructor)."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    try:
        return _REGISTRY[name](**(config or {}))
    except TypeError as err:
        raise UsageError(f"bad config for model {name!r}: {err}") from err


@register("tutorial")
class TutorialNet(nn.Module):
    """The PyTorch tutorial's LeNet-style network, layer for layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) normalised floats -> (N, num_classes) logits."""
        x = self.pool(F.relu(self.conv1(x)))  # (N, 6, 14, 14)
        x = self.pool(F.relu(self.conv2(x)))  # (N, 16, 5, 5)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
