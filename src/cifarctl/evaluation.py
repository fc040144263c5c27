"""`evaluate`: a weights file scored on a whole split, batched, with per-class counts and a
confusion matrix; the matrix can also be drawn as a PNG."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cifarctl import fsutil
from cifarctl.config import DownloadConfig, EvaluateConfig
from cifarctl.errors import UsageError
from cifarctl.progress import Reporter

CONFUSION_PNG = "confusion.png"


def check_classes(weights_path: Path, model_classes: list[str], data_classes: list[str]) -> None:
    """Refuse to score a model against labels that mean other classes."""
    if list(model_classes) != list(data_classes):
        raise UsageError(f"{weights_path} predicts {len(model_classes)} classes ({', '.join(model_classes[:4])}, ...) "
                         f"but the dataset has {len(data_classes)} ({', '.join(data_classes[:4])}, ...); "
                         "evaluate it on the dataset it was trained on (--data-dir)")


def evaluate_file(cfg: EvaluateConfig, reporter: Reporter) -> dict[str, Any]:
    """Score `cfg.weights` on a split; returns the JSON-able summary documented in docs/evaluate.md."""
    from cifarctl.data import ensure_dataset
    from cifarctl.metrics import evaluate_weights
    from cifarctl.train import resolve_device
    from cifarctl.weights import load_weights

    device = resolve_device(cfg.device)
    weights = load_weights(cfg.weights, str(device))  # checked before any download or output
    ds = ensure_dataset(DownloadConfig(data_dir=cfg.data_dir), reporter)
    check_classes(cfg.weights, weights.class_names, ds.class_names)
    split = ds.split(cfg.split)
    start = time.perf_counter()
    ev = evaluate_weights(weights, split.images, split.labels, cfg.batch_size)
    elapsed = time.perf_counter() - start
    summary: dict[str, Any] = {
        "weights": str(cfg.weights),
        "model": weights.meta["model"],
        "split": cfg.split,
        "images": ev.total,
        "device": str(device),
        "accuracy": ev.accuracy,
        "top3_accuracy": ev.top3_accuracy,
        "loss": ev.loss,
        "correct": ev.correct,
        "correct_top3": ev.correct_top3,
        "time_s": round(elapsed, 3),
        "images_per_s": round(ev.total / max(elapsed, 1e-9), 1),
        "class_names": list(weights.class_names),
        "per_class": ev.per_class(weights.class_names),
        "confusion": ev.confusion.tolist(),
        "files": {},
    }
    if cfg.confusion:
        out_dir = Path(cfg.output_dir) if cfg.output_dir is not None else Path(cfg.weights).parent
        png = out_dir / CONFUSION_PNG
        plot_confusion(summary["confusion"], summary["class_names"], png,
                       f"{summary['model']} on {cfg.split}: {100 * ev.accuracy:.2f}% of {ev.total:,} images")
        summary["files"]["confusion_png"] = str(png)
    return summary


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    """Draw the matrix (rows: true class, columns: predicted) with every count written in its cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion)
    n = len(class_names)
    # Colour by the share of each true class, so that classes of different sizes compare.
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.5 + 0.7 * n))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    for t in range(n):
        for p in range(n):
            ax.text(p, t, f"{counts[t, p]:,}", ha="center", va="center", fontsize=8,
                    color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    try:
        with fsutil.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}; choose another --output-dir") from err
    finally:
        plt.close(fig)
