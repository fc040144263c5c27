"""`predict`: classify image files in batches; a file that cannot be read is reported and skipped,
the rest are still classified."""

from __future__ import annotations

from typing import Any

from cifarctl.config import PredictConfig
from cifarctl.progress import Reporter

_PROGRESS_FROM = 500  # fewer files finish before a progress bar would be worth drawing


def predict_files(cfg: PredictConfig, reporter: Reporter) -> dict[str, Any]:
    """Classify every image `cfg.paths` names; returns the JSON-able summary documented in
    docs/predict.md, whose "errors" list every path that produced no prediction."""
    import torch

    from cifarctl.device import resolve_device
    from cifarctl.images import collect_images, load_images
    from cifarctl.metrics import predict_logits
    from cifarctl.rundir import weights_file
    from cifarctl.weights import load_weights

    weights_path = weights_file(cfg.weights)
    weights = load_weights(weights_path, str(resolve_device(cfg.device)))
    class_names = list(weights.class_names)
    k = max(1, min(cfg.top_k, len(class_names)))
    files, problems = collect_images(cfg.paths)
    results: list[dict[str, Any]] = []
    progress = reporter if len(files) >= _PROGRESS_FROM else Reporter()
    with progress.task("classifying", len(files)) as task:
        for start in range(0, len(files), cfg.batch_size):
            chunk = files[start:start + cfg.batch_size]
            images, ok, failed = load_images(chunk)  # (m, 32, 32, 3) uint8
            problems += failed
            probs = torch.softmax(predict_logits(weights, images, cfg.batch_size), 1).cpu()  # (m, C)
            top_p, top_i = probs.topk(k, 1)
            for row, i in enumerate(ok):
                ranked = [{"class": class_names[c], "probability": float(p)}
                          for p, c in zip(top_p[row].tolist(), top_i[row].tolist())]
                results.append({"path": str(chunk[i]), "class": ranked[0]["class"],
                                "probability": ranked[0]["probability"], "top_k": ranked,
                                "probabilities": [round(p, 6) for p in probs[row].tolist()]})
            task.advance(len(chunk))
    return {
        "weights": str(weights_path),
        "model": weights.meta["model"],
        "class_names": class_names,
        "top_k": k,
        "results": results,
        "errors": [{"path": p.path, "error": p.error} for p in problems],
    }
