"""Batched evaluation: accuracy (top-1, top-3), mean loss, per-class counts, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Evaluation:
    """Counts from one pass over a split; `confusion[t, p]` counts true class t predicted as p."""

    total: int
    correct: int
    correct_top3: int
    loss: float  # mean cross-entropy
    confusion: torch.Tensor  # (C, C) int64

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy in [0, 1]."""
        return self.correct / max(self.total, 1)

    @property
    def top3_accuracy(self) -> float:
        """Top-3 accuracy in [0, 1]."""
        return self.correct_top3 / max(self.total, 1)

    def per_class(self, class_names: list[str]) -> list[dict[str, Any]]:
        """[{class, correct, total, accuracy}] in class-index order."""
        rows = []
        for i, name in enumerate(class_names):
            total = int(self.confusion[i].sum())
            correct = int(self.confusion[i, i])
            rows.append({"class": name, "correct": correct, "total": total,
                         "accuracy": correct / total if total else 0.0})
        return rows


@torch.no_grad()
def logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Model outputs for normalised (N, 3, 32, 32) images, in batches; (N, C) float32."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             batch_size: int = 1000) -> Evaluation:
    """Evaluate on normalised images (N, 3, 32, 32) and int64 labels (N,), both on the model's device."""
    out = logits(model, images, batch_size)
    labels = labels.to(out.device)
    pred = out.argmax(1)
    k = min(3, out.shape[1])
    top3 = (out.topk(k, 1).indices == labels[:, None]).any(1)
    confusion = torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return Evaluation(
        total=len(labels),
        correct=int((pred == labels).sum()),
        correct_top3=int(top3.sum()),
        loss=float(F.cross_entropy(out, labels)) if len(labels) else 0.0,
        confusion=confusion.view(num_classes, num_classes).cpu(),
    )
