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
    logs = [r for r in rows if r["kind"] == "log" and r["train_loss"] not in ("", None)]
    epochs = [r for r in rows if r["kind"] == "epoch" and r.get("test_acc") not in ("", None)]
    with _figure(1, 2, figsize=(10, 4)) as (fig, (ax1, ax2)):
        ax1.plot([int(r["step"]) for r in logs], [float(r["train_loss"]) for r in logs], label="train (running)")
        ax1.plot([int(r["step"]) for r in epochs], [float(r["test_loss"]) for r in epochs], "o-", label="test")
        ax1.set(xlabel="step", ylabel="cross-entropy loss", title="loss")
        ax1.legend()
        ax2.plot([int(r["step"]) for r in epochs], [100 * float(r["test_acc"]) for r in epochs], "o-")
        ax2.set(xlabel="step", ylabel="test accuracy (%)", title="test accuracy")
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
    with _figure(figsize=(1.0 + 0.75 * n, 0.5 + 0.7 * n)) as (fig, ax):
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
        _save(fig, path)
