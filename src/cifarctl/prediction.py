"""`predict`: classify image files in batches; a file that cannot be read is reported and skipped,
the rest are still classified. A weights file is run with PyTorch; an exported `.onnx` file with
onnxruntime, without importing torch at all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarctl.config import PredictConfig
from cifarctl.progress import Reporter

_PROGRESS_FROM = 500  # fewer files finish before a progress bar would be worth drawing


@dataclass
class Backend:
    """A loaded model as `predict` uses it: its classes, and uint8 HWC images -> probabilities (N, C)."""

    model: str
    class_names: list[str]
    probabilities: Callable[[np.ndarray], np.ndarray]
    image_size: int = 32  # files are read at the size the model was trained on


def load_backend(weights_path: Path, device: str = "auto", batch_size: int = 256) -> Backend:
    """The model in a weights file (PyTorch) or an exported .onnx file (onnxruntime, no torch)."""
    from cifarctl.onnx_runtime import is_onnx

    if is_onnx(weights_path):
        from cifarctl.onnx_runtime import load_onnx, softmax

        onnx = load_onnx(weights_path)
        return Backend(onnx.meta["model"], list(onnx.class_names),
                       lambda images: softmax(onnx.logits(images, batch_size)), onnx.image_size)
    import torch

    from cifarctl.device import resolve_device
    from cifarctl.metrics import predict_logits
    from cifarctl.weights import load_weights

    weights = load_weights(weights_path, str(resolve_device(device)))
    return Backend(weights.meta["model"], list(weights.class_names),
                   lambda images: torch.softmax(predict_logits(weights, images, batch_size), 1).cpu().numpy(),
                   weights.image_size)


def ranked(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most probable classes per row, most probable first (ties: lower index first)."""
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def predict_files(cfg: PredictConfig, reporter: Reporter) -> dict[str, Any]:
    """Classify every image `cfg.paths` names; returns the JSON-able summary documented in
    docs/predict.md, whose "errors" list every path that produced no prediction."""
    from cifarctl.images import collect_images, load_images
    from cifarctl.rundir import weights_file

    weights_path = weights_file(cfg.weights)
    backend = load_backend(weights_path, cfg.device, cfg.batch_size)
    class_names = backend.class_names
    k = max(1, min(cfg.top_k, len(class_names)))
    files, problems = collect_images(cfg.paths)
    results: list[dict[str, Any]] = []
    progress = reporter if len(files) >= _PROGRESS_FROM else Reporter()
    with progress.task("classifying", len(files)) as task:
        for start in range(0, len(files), cfg.batch_size):
            chunk = files[start:start + cfg.batch_size]
            images, ok, failed = load_images(chunk, backend.image_size)  # (m, S, S, 3) uint8
            problems += failed
            probs = backend.probabilities(images)  # (m, C) float32
            top = ranked(probs, k)
            for row, i in enumerate(ok):
                best = [{"class": class_names[c], "probability": float(probs[row, c])} for c in top[row].tolist()]
                results.append({"path": str(chunk[i]), "class": best[0]["class"],
                                "probability": best[0]["probability"], "top_k": best,
                                "probabilities": [round(p, 6) for p in probs[row].tolist()]})
            task.advance(len(chunk))
    return {
        "weights": str(weights_path),
        "model": backend.model,
        "class_names": class_names,
        "top_k": k,
        "results": results,
        "errors": [{"path": p.path, "error": p.error} for p in problems],
    }
