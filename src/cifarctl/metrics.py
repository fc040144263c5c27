"""Batched evaluation: accuracy (top-1, top-3), mean loss, per-class counts, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cifarctl.augment import Preprocess
    from cifarctl.weights import Weights


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


def eval_batch(device: torch.device) -> int:
    """Images per forward pass when scoring: on 2 CPU cores, 128 scored CIFAR-10's test set with
    six TTA views in 25 s where 1000 took 38 s, and held 300 MB less at the peak (caches favour
    small batches there); a GPU keeps its large batches."""
    return 128 if device.type == "cpu" else 1000


@torch.no_grad()
def logits(model: torch.nn.Module, images: Any, batch_size: int | None = None, tta: str = "none",
           bf16: bool = False, prep: Preprocess | None = None) -> torch.Tensor:
    """Model outputs for images in batches; (N, C) float32. The images are normalised floats
    (N, 3, H, W) on the model's device, or, with `prep`, uint8 HWC (N, H, W, 3) anywhere (a memory
    map too) that `prep` normalises a batch at a time.

    `tta` averages the logits over test-time augmentation views (see augment.tta_views);
    `bf16` runs the forward passes under bfloat16 autocast.
    """
    return plain_and_tta_logits(model, images, batch_size, tta, bf16, prep)[1]


@torch.no_grad()
def plain_and_tta_logits(model: torch.nn.Module, images: Any, batch_size: int | None = None, tta: str = "none",
                         bf16: bool = False, prep: Preprocess | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, TTA-averaged) logits, each (N, C) float32, from one pass: the plain logits are
    those of the first view (the image as it is), so scoring both costs no extra forward pass.
    Arguments as for `logits`."""
    from cifarctl.augment import tta_views

    was_training = model.training
    model.eval()
    device = prep.device if prep is not None else images.device
    device_type = device.type if device.type in ("cpu", "cuda") else "cpu"
    batch_size = batch_size or eval_batch(device)
    plain, averaged = [], []
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(images), batch_size):
            x = prep(images[i:i + batch_size]) if prep is not None else images[i:i + batch_size]
            # The shifted views are strided slices; a dense copy in the model's layout spares the
            # convolution a slower strided read.
            outs = [model(v.contiguous(memory_format=_layout(model))).float() for v in tta_views(x, tta)]
            plain.append(outs[0])
            averaged.append(torch.stack(outs).mean(0) if len(outs) > 1 else outs[0])
    model.train(was_training)
    if not plain:
        return torch.zeros((0, 0)), torch.zeros((0, 0))
    return torch.cat(plain), torch.cat(averaged)


def _layout(model: torch.nn.Module) -> torch.memory_format:
    """channels_last when the model's first 4-d weight is stored that way, else contiguous."""
    for p in model.parameters():
        if p.dim() == 4:
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() \
                else torch.contiguous_format
    return torch.contiguous_format


def evaluate(model: torch.nn.Module, images: Any, labels: torch.Tensor, num_classes: int,
             batch_size: int | None = None, tta: str = "none", bf16: bool = False, prep: Preprocess | None = None) -> Evaluation:
    """Evaluate on images (normalised, or uint8 with `prep`: see `logits`) and int64 labels (N,)."""
    return score(logits(model, images, batch_size, tta, bf16, prep), labels, num_classes)


def evaluate_plain_and_tta(model: torch.nn.Module, images: Any, labels: torch.Tensor, num_classes: int,
                           tta: str, bf16: bool = False, prep: Preprocess | None = None) -> tuple[Evaluation, Evaluation]:
    """(plain, with `tta`) evaluations from one pass over the views (see `plain_and_tta_logits`)."""
    plain, averaged = plain_and_tta_logits(model, images, None, tta, bf16, prep)
    return score(plain, labels, num_classes), score(averaged, labels, num_classes)


def score(out: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Evaluation:
    """Counts for logits (N, C) against int64 labels (N,)."""
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


@torch.no_grad()
def predict_logits(weights: Weights, images: Any, batch_size: int | None = None) -> torch.Tensor:
    """Logits (N, C) float32 of the model in `weights` for uint8 HWC images (N, H, W, 3).

    Each batch is normalised with the mean/std stored in the weights' metadata and moved to the
    model's device. Every command that runs a model on images comes through here, so test-time
    augmentation belongs here and nowhere else.
    """
    from cifarctl.augment import Preprocess

    # Channels-last conv weights: the same mathematics, and on 2 CPU cores the tutorial net scores
    # the 10,000 test images in about half the time (oneDNN skips a layout conversion per conv).
    model = weights.model.to(memory_format=torch.channels_last)
    device = next(model.parameters()).device
    mean, std = weights.meta["mean"], weights.meta["std"]
    from cifarctl.device import native_bf16

    # bf16 as trained where the hardware has it; emulated bf16 would only be slower than float32.
    tta, bf16 = weights.meta.get("tta", "none"), weights.meta.get("precision") == "bf16" and native_bf16(device)
    if not len(images):
        return torch.zeros((0, len(weights.class_names)), device=device)
    return logits(model, images, batch_size, tta, bf16, Preprocess(mean, std, device))


def evaluate_weights(weights: Weights, images: Any, labels: torch.Tensor, batch_size: int | None = None) -> Evaluation:
    """Evaluate a loaded weights file on uint8 HWC images (N, H, W, 3) and int64 labels (N,)."""
    return score(predict_logits(weights, images, batch_size), labels, len(weights.class_names))
