"""Weights files: safetensors with the model's name, config, class names and normalisation in
the metadata, so a model is rebuilt from the file alone. Nothing is ever unpickled."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarctl import fsutil
from cifarctl.errors import UsageError

WEIGHTS_FORMAT = "cifarctl-weights"
MAX_HEADER_BYTES = 16 << 20  # a real header is a few KiB; anything near this is hostile or broken


@dataclass
class Weights:
    """A model rebuilt from a weights file, with the file's metadata (JSON fields decoded)."""

    model: Any  # torch.nn.Module in eval mode
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        """The classes the model predicts, in output order."""
        return self.meta["class_names"]


_JSON_FIELDS = ("model_config", "class_names", "mean", "std", "train_config")


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata holds strings only: JSON-encode everything that is not one."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def save_weights(path: Path, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a state dict plus metadata atomically. `meta` must name `model` and its `model_config`."""
    from safetensors.torch import save_file

    # Copies break any sharing of storage (safetensors refuses shared tensors) and leave the device.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    with fsutil.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=encode_metadata({"format": WEIGHTS_FORMAT, **meta}))


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a safetensors header by hand, with bounds checks, before any tensor is read.

    Returns (tensor entries, metadata). Raises UsageError naming the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist; train a model first (`cifarctl train`)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UsageError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise UsageError(
                f"{path} is not a valid safetensors file (header of {n:,} bytes in a file of {size:,}); "
                "a pickle or other file renamed to .safetensors?"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UsageError(f"{path} is not a valid safetensors file (its header is not JSON)") from err
    if not isinstance(header, dict):
        raise UsageError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise UsageError(f"{path} is truncated or corrupt (tensor {name!r} lies outside the file)")
    return header, meta


def read_metadata(path: Path) -> dict[str, Any]:
    """The checked, decoded metadata of a cifarctl weights file."""
    _, raw = read_header(path)
    if raw.get("format") != WEIGHTS_FORMAT:
        raise UsageError(f"{path} is a safetensors file but not cifarctl weights (no format={WEIGHTS_FORMAT} metadata)")
    meta: dict[str, Any] = dict(raw)
    for key in _JSON_FIELDS:
        if key not in meta:
            if key == "train_config":
                continue
            raise UsageError(f"{path} lacks the {key!r} metadata; it was not written by cifarctl train")
        try:
            meta[key] = json.loads(meta[key])
        except (ValueError, RecursionError) as err:
            raise UsageError(f"{path}: metadata {key!r} is not valid JSON") from err
    _check_types(path, meta)
    return meta


def _check_types(path: Path, meta: dict[str, Any]) -> None:
    """Metadata a model is rebuilt from must have the right shapes, or later code would crash."""
    def bad(what: str) -> UsageError:
        return UsageError(f"{path}: metadata {what}; the file was not written by cifarctl train")

    names = meta["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise bad("'class_names' is not a list of names")
    if not isinstance(meta["model_config"], dict):
        raise bad("'model_config' is not an object")
    if meta["model_config"].get("num_classes", len(names)) != len(names):
        raise bad("'class_names' does not match the model's number of classes")
    for key in ("mean", "std"):
        value = meta[key]
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            raise bad(f"{key!r} is not 3 numbers")
    if not isinstance(meta.get("model"), str):
        raise bad("'model' is not a name")


def load_weights(path: Path, device: str = "cpu") -> Weights:
    """Rebuild the model a weights file describes and load its tensors (checked key by key)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cifarctl.models import build_model

    meta = read_metadata(path)
    model = build_model(meta["model"], meta["model_config"])
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"{path} is truncated or corrupt ({err})") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
        raise UsageError(f"{path} does not match model {meta['model']!r}: {what}")
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise UsageError(
                f"{path} does not match model {meta['model']!r}: {key} has shape "
                f"{tuple(tensors[key].shape)}, expected {tuple(value.shape)}"
            )
    model.load_state_dict(tensors)
    model.to(torch.device(device)).eval()
    return Weights(model, meta)
