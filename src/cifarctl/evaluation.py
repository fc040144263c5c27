"""`evaluate`: a weights file scored on a whole split, batched, with per-class counts and a
confusion matrix; the matrix can also be drawn as a PNG."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cifarctl import fsutil, rundir
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


def check_image_size(weights_path: Path, model_size: int, images: Any) -> None:
    """Refuse to run a model on images of another size than it was trained on (N, H, W, 3)."""
    size = images.shape[1]
    if size != model_size:
        raise UsageError(f"{weights_path} was trained on {model_size}x{model_size} images but this dataset's are "
                         f"{size}x{size}; use the dataset it was trained on (--dataset, --data-dir)")


def _dataset_for(weights_path: Path, meta: dict[str, Any], asked: str | None) -> str:
    """The weights' own dataset (CIFAR-10 for weights that predate the field); a different one
    asked for is refused: its labels mean other classes."""
    from cifarctl.config import DEFAULT_DATASET, check_dataset_name

    own = meta.get("dataset") or DEFAULT_DATASET
    if asked is not None and check_dataset_name(asked) != own:
        raise UsageError(f"{weights_path} was trained on {own!r}, not {asked!r}; evaluate it on --dataset {own} "
                         "(or leave --dataset out)")
    return check_dataset_name(own)


def _confusion_dir(cfg: EvaluateConfig, weights_path: Path) -> Path:
    """-o, else the weights file's folder; for the bundled weights (inside the installed package)
    the current folder."""
    from cifarctl import pretrained

    if cfg.output_dir is not None:
        return Path(cfg.output_dir)
    return Path.cwd() if weights_path.resolve() == pretrained.FILE.resolve() else weights_path.parent


def evaluate_file(cfg: EvaluateConfig, reporter: Reporter) -> dict[str, Any]:
    """Score `cfg.weights` on a split; returns the JSON-able summary documented in docs/evaluate.md."""
    from cifarctl.data import ensure_dataset
    from cifarctl.device import resolve_device
    from cifarctl.metrics import evaluate_weights
    from cifarctl.plots import plot_confusion
    from cifarctl.weights import load_weights

    device = resolve_device(cfg.device)
    weights_path = rundir.weights_file(cfg.weights)
    weights = load_weights(weights_path, str(device))  # checked before any download or output
    png = _confusion_dir(cfg, weights_path) / CONFUSION_PNG
    if cfg.confusion:
        fsutil.output_target(png)  # a folder or FIFO in the way is refused before the work
    dataset = _dataset_for(weights_path, weights.meta, cfg.dataset)
    ds = ensure_dataset(DownloadConfig(data_dir=cfg.data_dir, dataset=dataset), reporter)
    check_classes(weights_path, weights.class_names, ds.class_names)
    split = ds.split(cfg.split)
    check_image_size(weights_path, weights.image_size, split.images)
    start = time.perf_counter()
    ev = evaluate_weights(weights, split.images, split.labels, cfg.batch_size)
    elapsed = time.perf_counter() - start
    summary: dict[str, Any] = {
        "weights": str(weights_path),
        "model": weights.meta["model"],
        "dataset": dataset,
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
        plot_confusion(summary["confusion"], summary["class_names"], png,
                       f"{summary['model']} on {cfg.split}: {100 * ev.accuracy:.2f}% of {ev.total:,} images")
        summary["files"]["confusion_png"] = str(png)
    return summary
