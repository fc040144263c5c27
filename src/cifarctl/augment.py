"""The tensor-side transforms, all batched on the model's device (no per-sample Python): pixel
normalisation, seeded training augmentation and test-time augmentation views."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# mean, std per channel for --normalization. The tutorial's Normalize((0.5,)*3, (0.5,)*3) scales
# inputs to [-1, 1]; "dataset" uses the per-channel statistics of the CIFAR-10 training images.
NORMALIZATION = {
    "tutorial": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "dataset": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}


def normalise(images: Any, mean: list[float], std: list[float], device: Any, chunk: int = 10_000) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) HWC -> float32 (N, 3, 32, 32) on `device`, as (x/255 - mean) / std.

    Done in chunks, so that the float temporaries stay small when a whole split is normalised.
    """
    images = torch.as_tensor(images)
    n, h, w, _ = images.shape if images.ndim == 4 else (0, 32, 32, 3)
    out = torch.empty((n, 3, h, w), dtype=torch.float32, device=device)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    for start in range(0, n, chunk):
        part = images[start:start + chunk].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        out[start:start + chunk] = (part / 255 - m) / s
    return out


def pad_reflect(images: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H+2p, W+2p), reflecting the border; done once per run for random crops."""
    if pad == 0:
        return images
    out = torch.empty((*images.shape[:2], images.shape[2] + 2 * pad, images.shape[3] + 2 * pad),
                      dtype=images.dtype, device=images.device)
    for start in range(0, len(images), 5000):  # chunks keep F.pad's float temporaries small
        out[start:start + 5000] = F.pad(images[start:start + 5000].float(), (pad,) * 4, mode="reflect").to(images.dtype)
    return out


def random_crop(padded: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Crop each (C, size+2p, size+2p) image of the batch at its own random offset in [0, 2p]^2:
    a random translation by up to p pixels each way. One gather for the whole batch."""
    n, _, h, w = padded.shape
    dev = padded.device
    dy = torch.randint(0, h - size + 1, (n, 1), generator=generator, device=dev)
    dx = torch.randint(0, w - size + 1, (n, 1), generator=generator, device=dev)
    rows = (dy + torch.arange(size, device=dev)).view(n, 1, size, 1)  # (N, 1, size, 1)
    cols = (dx + torch.arange(size, device=dev)).view(n, 1, 1, size)  # (N, 1, 1, size)
    batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
    chans = torch.arange(padded.shape[1], device=dev).view(1, -1, 1, 1)
    return padded[batch, chans, rows, cols]  # (N, C, size, size)


def flip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images whose mask entry is True; (N, C, H, W) -> same."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def random_flip_mask(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A fresh coin per image: True means flip."""
    return torch.rand(n, generator=generator, device=device) < 0.5


def alternating_flip_mask(base: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's alternating flip: image i is flipped in epoch e iff base[i] xor (e odd), so every
    image is seen both ways in any two consecutive epochs instead of by chance."""
    return base[idx] ^ bool(epoch % 2)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one random size x size square per image (it may overlap the border)."""
    n, _, h, w = images.shape
    dev = images.device
    cy = torch.randint(0, h, (n, 1, 1), generator=generator, device=dev)
    cx = torch.randint(0, w, (n, 1, 1), generator=generator, device=dev)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)  # (N, H, W)
    return images.masked_fill(inside.unsqueeze(1), 0)


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views whose logits are averaged: none -> [x]; flip -> [x, flip(x)];
    flip-translate -> also x and flip(x) shifted one pixel up-left and down-right (reflect padding)."""
    if mode == "none":
        return [images]
    views = [images, images.flip(-1)]
    if mode == "flip-translate":
        padded = F.pad(images.float(), (1, 1, 1, 1), mode="reflect").to(images.dtype)
        h, w = images.shape[-2:]
        for base in (padded, padded.flip(-1)):
            views += [base[..., :h, :w], base[..., 2:, 2:]]
    elif mode != "flip":
        raise ValueError(f"unknown TTA mode {mode!r}")
    return views


class TrainBatches:
    """Augmented training batches for (idx, epoch), built once per run: crops come from a copy of
    the training set padded once up front; flips and cutout are drawn on the device from
    `generator`. `flip_base` (alternate flips) is part of the run's resumable state."""

    def __init__(self, images: torch.Tensor, generator: torch.Generator, *, crop_pad: int = 0, flip: str = "none",
                 cutout: int = 0, channels_last: bool = False) -> None:
        self.source = pad_reflect(images, crop_pad) if crop_pad else images
        self.size = images.shape[-1]
        self.generator = generator
        self.crop_pad, self.flip, self.cutout = crop_pad, flip, cutout
        self.flip_base = random_flip_mask(len(images), generator, images.device) if flip == "alternate" else None
        self.layout = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """The augmented batch (len(idx), 3, H, W) of training images `idx` in `epoch` (0-based)."""
        x = self.source[idx]
        if self.crop_pad:
            x = random_crop(x, self.size, self.generator)
        if self.flip == "random":
            x = flip_where(x, random_flip_mask(len(idx), self.generator, x.device))
        elif self.flip_base is not None:
            x = flip_where(x, alternating_flip_mask(self.flip_base, idx, epoch))
        if self.cutout:
            x = cutout(x, self.cutout, self.generator)
        return x.contiguous(memory_format=self.layout)
