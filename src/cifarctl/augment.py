"""Batched, seeded data augmentation as tensor ops on the training device (no per-sample Python)
and test-time augmentation views."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
