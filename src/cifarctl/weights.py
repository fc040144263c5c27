"""Weights files: safetensors with the model's name, config, class names and normalisation in
the metadata, so a model is rebuilt from the file alone. Nothing is ever unpickled."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarctl import tensorfile
from cifarctl.errors import UsageError

WEIGHTS_FORMAT = "cifarctl-weights"
MAX_HEADER_BYTES = 16 << 20  # a real header is a few KiB; anything near this is hostile or broken
MAX_NAME_CHARS = 200
MAX_NORM = 1e6  # bound on |mean| and on std and 1/std, so normalised float32 pixels stay finite
TTA_MODES = ("none", "flip", "flip-translate")
PRECISIONS = ("fp32", "bf16")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors names; all are read as the model's float32
# str(torch dtype) -> safetensors name, for the non-float tensors (BatchNorm's step counts) that must match exactly
_EXACT_DTYPES = {"torch.int64": "I64", "torch.int32": "I32", "torch.uint8": "U8", "torch.bool": "BOOL"}


class ModelInfo:
    """What a model's checked metadata says about its inputs and outputs: weights files and
    exported files alike."""

    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        """The classes the model predicts, in output order."""
        return self.meta["class_names"]

    @property
    def image_size(self) -> int:
        """The side of the square images the model was trained on (files from before 64x64 datasets: 32)."""
        return int(self.meta.get("image_size", 32))


@dataclass
class Weights(ModelInfo):
    """A model rebuilt from a weights file, with the file's metadata (JSON fields decoded)."""

    model: Any  # torch.nn.Module in eval mode
    meta: dict[str, Any]


_JSON_FIELDS = ("model_config", "class_names", "mean", "std", "train_config")


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata holds strings only: JSON-encode everything that is not one."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def save_weights(path: Path, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a state dict plus metadata atomically. `meta` must name `model` and its `model_config`."""
    tensorfile.save(path, state_dict, encode_metadata({"format": WEIGHTS_FORMAT, **meta}))


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
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise UsageError(f"{path} is not a valid safetensors file (its metadata is not an object of strings)")
    data_len = size - 8 - n
    for name, entry in header.items():
        if not _entry_ok(entry, data_len):
            raise UsageError(f"{path} is truncated or corrupt (tensor {_short(name)} lies outside the file)")
    return header, meta


def _entry_ok(entry: Any, data_len: int) -> bool:
    """A tensor entry has a dtype name, a shape of sizes and data offsets inside the data section."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        return False
    return (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    """repr clipped to one short line: hostile values can be megabytes long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_metadata(path: Path) -> dict[str, Any]:
    """The checked, decoded metadata of a cifarctl weights file."""
    _, raw = read_header(path)
    return _decode_metadata(path, raw)


def _decode_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
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
    """Every metadata value later code uses must have the right type and lie within bounds, or a hostile
    file could crash it, make it allocate without limit, or turn every score into nan."""
    from cifarctl.models import validate_config

    def bad(what: str) -> UsageError:
        return UsageError(f"{path}: metadata {what}; the file was not written by cifarctl train")

    if not isinstance(meta.get("model"), str):
        raise bad("'model' is not a name")
    try:
        validate_config(meta["model"], meta["model_config"])
    except UsageError as err:
        raise UsageError(f"{path}: bad metadata: {err}") from err
    _check_class_names(meta, bad)
    for key, lo, hi in (("mean", -MAX_NORM, MAX_NORM), ("std", 1 / MAX_NORM, MAX_NORM)):
        value = meta[key]
        if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) and lo <= v <= hi for v in value)):
            raise bad(f"{key!r} is not 3 numbers in [{lo:g}, {hi:g}] but {_short(value)}")
    for key, allowed in (("tta", TTA_MODES), ("precision", PRECISIONS)):
        if key in meta and meta[key] not in allowed:
            raise bad(f"{key!r} is {_short(meta[key])}, not one of {', '.join(allowed)}")
    if "image_size" in meta:
        size = meta["image_size"]  # a string of digits as metadata, an int if JSON-decoded
        size = int(size) if isinstance(size, str) and size.isascii() and size.isdigit() else size
        if not (_is_int(size) and 8 <= size <= 512):
            raise bad(f"'image_size' is {_short(meta['image_size'])}, not an integer in [8, 512]")
        meta["image_size"] = size
    if "train_config" in meta and not isinstance(meta["train_config"], dict):
        raise bad("'train_config' is not an object")


def _check_class_names(meta: dict[str, Any], bad: Callable[[str], UsageError]) -> None:
    """One printable, distinct, non-empty name per model output: they are printed and used as labels."""
    from cifarctl.models import config_num_classes

    names = meta["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise bad("'class_names' is not a list of names")
    wrong = [n for n in names if not (0 < len(n) <= MAX_NAME_CHARS and n.isprintable())]
    if wrong:
        raise bad(f"'class_names' holds {_short(wrong[0])}, not a printable name of 1 to {MAX_NAME_CHARS} characters")
    if len(set(names)) != len(names):
        duplicate = next(n for i, n in enumerate(names) if n in names[:i])
        raise bad(f"'class_names' names {_short(duplicate)} twice")
    expected = config_num_classes(meta["model"], meta["model_config"])
    if len(names) != expected:
        raise bad(f"'class_names' has {len(names)} names but the model has {expected} classes")


def load_weights(path: Path, device: str = "cpu") -> Weights:
    """Rebuild the model a weights file describes and load its tensors, all checked first.

    The model is laid out on the meta device and compared with the file's header before anything is
    allocated, so memory use is bounded by the file's size. Float16 and bfloat16 tensors are widened
    to float32, exactly.
    """
    import torch

    from cifarctl.models import build_model

    entries, raw = read_header(path)
    meta = _decode_metadata(path, raw)
    with torch.device("meta"):
        skeleton = build_model(meta["model"], meta["model_config"])
    expected = skeleton.state_dict()
    _check_entries(path, meta["model"], entries, expected)
    tensors = _read_tensors(path, expected)
    if {k for k, _ in skeleton.named_parameters()} | {k for k, _ in skeleton.named_buffers()} <= set(expected):
        model = skeleton.to_empty(device="cpu")
    else:  # a non-persistent buffer would stay uninitialised: let the constructor set it
        model = build_model(meta["model"], meta["model_config"])
    model.load_state_dict(tensors)
    model.to(torch.device(device)).eval()
    return Weights(model, meta)


def _check_entries(path: Path, model: str, entries: dict[str, Any], expected: dict[str, Any]) -> None:
    """The file's tensor names, shapes and dtypes (from its header) against the model's state dict."""
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing or extra:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(map(_short, extra[:3]))}"
        raise UsageError(f"{path} does not match model {model!r}: {what}")
    for key, value in expected.items():
        shape, dtype = tuple(entries[key]["shape"]), entries[key]["dtype"]
        if shape != tuple(value.shape):
            raise UsageError(f"{path} does not match model {model!r}: {key} has shape {shape}, "
                             f"expected {tuple(value.shape)}")
        allowed = _FLOAT_DTYPES if value.dtype.is_floating_point else (_EXACT_DTYPES.get(str(value.dtype)),)
        if dtype not in allowed:
            raise UsageError(f"{path} does not match model {model!r}: {key} is of type {_short(dtype)}, "
                             f"expected {' or '.join(map(str, allowed))}")


def _read_tensors(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Every tensor, float ones widened to the model's dtype and checked to be finite."""
    import torch

    try:
        tensors, _ = tensorfile.load(path)
    except tensorfile.TensorFileError as err:
        raise UsageError(f"{path} is truncated or corrupt ({err})") from err
    for key, value in expected.items():
        if value.dtype.is_floating_point:
            tensors[key] = tensors[key].to(value.dtype)
            if not torch.isfinite(tensors[key]).all():
                raise UsageError(f"{path}: tensor {key} holds NaN or infinite values; the weights are broken, "
                                 "train again or use an earlier weights file")
    return tensors
