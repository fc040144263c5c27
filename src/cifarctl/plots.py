"""PNG charts (training curves, confusion matrix) through matplotlib, imported only when drawing.

Every text drawn here is data (class names, model names, paths): mathtext is off, so a `$` in a
class name is drawn as a dollar sign instead of switching to maths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cifarctl import fsutil

_RC = {"text.parse_math": False, "text.usetex": False}
MAX_LABELLED = 20  # classes up to which the confusion matrix labels every class and writes every count


@contextlib.contextmanager
def _figure(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure on the Agg backend with mathtext off; closed afterwards, global rc unchanged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(_RC):
        fig, axes = plt.subplots(*args, **kwargs)
        try:
            yield fig, axes
        finally:
            plt.close(fig)


def _save(fig: Any, path: Path) -> None:
    with fsutil.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and test accuracy against training steps, as a PNG."""
    logs = [r for r in rows if r["kind"] == "log" and r.get("train_loss") not in ("", None)]
    with _figure(1, 2, figsize=(10, 4)) as (fig, (ax1, ax2)):
        ax1.plot([int(r["step"]) for r in logs], [float(r["train_loss"]) for r in logs], label="train (running)")
        for split in ("val", "test"):
            points = [r for r in rows if r["kind"] == "epoch" and r.get(f"{split}_acc") not in ("", None)]
            label = "validation" if split == "val" else "test"
            steps = [int(r["step"]) for r in points]
            ax1.plot(steps, [float(r[f"{split}_loss"]) for r in points], "o-", label=label)
            ax2.plot(steps, [100 * float(r[f"{split}_acc"]) for r in points], "o-", label=label)
        ax1.set(xlabel="step", ylabel="cross-entropy loss", title="loss")
        ax1.legend()
        ax2.legend()
        ax2.set(xlabel="step", ylabel="accuracy (%)", title="accuracy")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        _save(fig, path)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    """Draw the matrix (rows: true class, columns: predicted) with every count written in its cell."""
    import numpy as np

    counts = np.asarray(confusion)
    n = len(class_names)
    # Colour by the share of each true class, so that classes of different sizes compare.
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    # Up to 20 classes every cell shows its count; beyond that the figure stays a readable size,
    # cells are colour only, and every 5th class is labelled (the counts are in --json).
    side = 0.75 * min(n, MAX_LABELLED) + (0.12 * (n - MAX_LABELLED) if n > MAX_LABELLED else 0)
    with _figure(figsize=(1.5 + side, 1.0 + side)) as (fig, ax):
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
        if n <= MAX_LABELLED:
            for t in range(n):
                for p in range(n):
                    ax.text(p, t, f"{counts[t, p]:,}", ha="center", va="center", fontsize=8,
                            color="white" if share[t, p] > 0.5 else "black")
        ticks = list(range(0, n, 1 if n <= MAX_LABELLED else 5))
        ax.set_xticks(ticks, [class_names[i] for i in ticks], rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(ticks, [class_names[i] for i in ticks])
        ax.set(xlabel="predicted class", ylabel="true class", title=title)
        fig.tight_layout()
        _save(fig, path)
