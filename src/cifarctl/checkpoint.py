"""Resumable training state in one safetensors file: tensors for weights, optimizer buffers,
the epoch's shuffle order and RNG states; JSON metadata for the rest. Loading it runs no code."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarctl import fsutil
from cifarctl.errors import CifarctlError


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random-number state a run depends on, as (tensors, JSON-able values).

    `generators` are the run's own torch generators (shuffling, augmentation), saved by name.
    """
    tensors = {"rng.torch": torch.get_rng_state()}
    tensors.update({f"rng.{name}": g.get_state() for name, g in generators.items()})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    values = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, values


def set_rng_state(tensors: dict[str, torch.Tensor], values: dict[str, Any],
                  generators: dict[str, torch.Generator]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(tensors["rng.torch"])
    for name, g in generators.items():
        g.set_state(tensors[f"rng.{name}"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a checkpoint atomically; `meta` must be JSON-able."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with fsutil.atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"cifarctl_checkpoint": json.dumps(meta)})


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save`."""
    from safetensors import safe_open

    if not path.is_file():
        raise CifarctlError(f"no checkpoint at {path}; is it a cifarctl run directory?")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["cifarctl_checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for damaged files
        raise CifarctlError(f"checkpoint {path} is unreadable ({err}); start a new run") from err
    return tensors, meta
