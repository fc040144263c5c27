"""Run a classifier exported by `cifarctl export --format onnx` with onnxruntime.

Deployment without torch is the point of this module: it imports numpy and onnxruntime only, and
reads everything it needs (class names, model name, TTA) from the file's metadata_props.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarctl.errors import UsageError
from cifarctl.weights import ModelInfo

ONNX_FORMAT = "cifarctl-onnx"
INSTALL_HINT = "pip install 'cifarctl[export]'"
MAX_NAME_CHARS = 200  # as for weights files: names are printed and used as labels


def is_onnx(path: Path | str) -> bool:
    """True for a path that names an ONNX file (by its suffix)."""
    return Path(path).suffix.lower() == ".onnx"


def missing_package(package: str) -> UsageError:
    """The one-line error for an optional package that is not installed."""
    return UsageError(f"{package} is not installed; install the export extra: {INSTALL_HINT}")


def import_onnxruntime() -> Any:
    """onnxruntime, or a UsageError with the install hint."""
    try:
        import onnxruntime
    except ImportError as err:
        raise missing_package("onnxruntime") from err
    return onnxruntime


def session(model: bytes | str, threads: int = 0) -> Any:
    """An onnxruntime CPU inference session for a model file or its bytes (0 threads: onnxruntime's choice)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: its warnings are not the user's problem
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_pixels(sess: Any, pixels: np.ndarray) -> np.ndarray:
    """Logits (N, C) float32 of a session for float32 RGB pixels in [0, 1], (N, 3, S, S)."""
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: np.ascontiguousarray(pixels, np.float32)})[0], np.float32)


def to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 HWC (N, S, S, 3) -> float32 NCHW in [0, 1], the exported graph's input."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), np.float32) / np.float32(255)


@dataclass
class OnnxClassifier(ModelInfo):
    """An exported model ready to run, with its checked metadata."""

    path: Path
    session: Any
    meta: dict[str, Any]

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits (N, C) float32 for uint8 HWC images (N, S, S, 3), in batches."""
        outs = [run_pixels(self.session, to_pixels(images[i:i + batch_size]))
                for i in range(0, len(images), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.class_names)), np.float32)


def load_onnx(path: Path | str) -> OnnxClassifier:
    """Open an exported .onnx file; UsageError when it is not one cifarctl wrote."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"ONNX file {path} does not exist or is not a file; export one with cifarctl export")
    import_onnxruntime()
    try:
        sess = session(str(path))
    except Exception as err:  # onnxruntime raises its own types for every kind of broken file
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path} is not a valid ONNX model ({first})") from err
    meta = read_meta(path, sess.get_modelmeta().custom_metadata_map)
    outputs = sess.get_outputs()[0].shape
    if len(outputs) == 2 and isinstance(outputs[1], int) and outputs[1] != len(meta["class_names"]):
        raise UsageError(f"{path}: metadata names {len(meta['class_names'])} classes but the model has "
                         f"{outputs[1]} outputs; export it again with cifarctl export")
    return OnnxClassifier(path, sess, meta)


def read_meta(path: Path, props: dict[str, str]) -> dict[str, Any]:
    """The metadata_props of an exported file, JSON fields decoded and checked."""
    def bad(what: str) -> UsageError:
        return UsageError(f"{path}: ONNX metadata {what}; export the model with cifarctl export")

    if props.get("format") != ONNX_FORMAT:
        raise bad(f"has no format={ONNX_FORMAT}")
    meta: dict[str, Any] = dict(props)
    for key in ("class_names", "mean", "std"):
        try:
            meta[key] = json.loads(props[key])
        except (KeyError, ValueError, RecursionError):
            raise bad(f"{key!r} is missing or not JSON") from None
    names = meta["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS
                                                      and n.isprintable() for n in names)):
        raise bad("'class_names' is not a list of printable names")
    if len(set(names)) != len(names):
        raise bad("'class_names' names a class twice")
    for key in ("mean", "std"):
        value = meta[key]
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
            raise bad(f"{key!r} is not 3 numbers")
    if not isinstance(meta.get("model"), str):
        raise bad("'model' is not a name")
    meta.setdefault("tta", "none")
    size = str(meta.get("image_size", "32"))
    if not (size.isascii() and size.isdigit() and 8 <= int(size) <= 512):
        raise bad("'image_size' is not a whole number in [8, 512]")
    meta["image_size"] = int(size)
    return meta


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
