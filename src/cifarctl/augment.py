"""The tensor-side transforms, all batched on the model's device (no per-sample Python): pixel
normalisation, seeded training augmentation and test-time augmentation views."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# mean, std per channel for --normalization. The tutorial's Normalize((0.5,)*3, (0.5,)*3) scales
# inputs to [-1, 1]; "dataset" uses the per-channel statistics of the CIFAR-10 training images.
NORMALIZATION = {
    "tutorial": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "dataset": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}


class Preprocess:
    """uint8 HWC images (N, H, W, 3), on any device -> (x/255 - mean) / std as (N, 3, H, W) floats
    of `dtype` on `device`: the one normalisation that training, evaluation and prediction share.
    Elementwise, so a batch comes out bit for bit as it would from normalising the whole set."""

    def __init__(self, mean: list[float], std: list[float], device: Any, dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, images: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised batch; written into `out` (float32, (N, 3, H, W), on the device) when given:
        a buffer reused across batches skips the page faults of fresh memory, which on the CPU cost
        more than the arithmetic."""
        x = torch.as_tensor(images).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device) if out is None else out
        out.copy_(x)  # uint8 -> float32 is exact; the layout becomes NCHW in the same pass
        out.div_(255).sub_(self.mean).div_(self.std)
        return out if self.dtype == torch.float32 else out.to(self.dtype)


def normalise(images: Any, mean: list[float], std: list[float], device: Any, chunk: int = 10_000) -> torch.Tensor:
    """uint8 (N, H, W, 3) HWC -> float32 (N, 3, H, W) on `device`, as (x/255 - mean) / std; in
    chunks, so that the float temporaries stay small."""
    images = torch.as_tensor(images)
    prep = Preprocess(mean, std, device)
    if images.ndim != 4 or not len(images):
        return torch.empty((0, 3, 32, 32), dtype=torch.float32, device=device)
    return torch.cat([prep(images[start:start + chunk]) for start in range(0, len(images), chunk)])


def pad_reflect(images: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H+2p, W+2p), reflecting the border (per batch, for random crops)."""
    if pad == 0:
        return images
    return F.pad(images.float(), (pad,) * 4, mode="reflect").to(images.dtype)


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


class Rows:
    """Some rows of an image array, read only when sliced: a held-out split without a copy."""

    def __init__(self, images: Any, rows: torch.Tensor) -> None:
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, part: slice) -> Any:
        return self.images[self.rows[part].to(self.images.device)]


class TrainBatches:
    """Augmented training batches, read per batch from the uint8 images (a memory-mapped cache or a
    uint8 copy on the device): resident memory beyond the images is O(batch).

    The rows of an epoch are gathered and normalised a chunk of steps ahead (about 4 MB of floats),
    which keeps per-step overhead off small batches (the tutorial's 4); crops pad each batch by
    reflection, and crops, flips and cutout are drawn per batch from `generator`, in the order the
    whole-set version drew them, so a seed gives the same batches bit for bit. `flip_base`
    (alternate flips) is part of the run's resumable state.
    """

    CHUNK_BYTES = 4 << 20  # 16 MB held the training peak 44 MB higher (heap fragmentation), no faster

    def __init__(self, images: torch.Tensor, prep: Preprocess, generator: torch.Generator, *,
                 rows: torch.Tensor | None = None, crop_pad: int = 0, flip: str = "none", cutout: int = 0,
                 channels_last: bool = False, release: Callable[[], None] | None = None) -> None:
        self.images = images  # (M, H, W, 3) uint8
        # Hands the pages of a memory-mapped `images` back after each chunk (a no-op otherwise).
        self.release = release if release is not None else (lambda: None)
        self.rows = rows  # training index -> row of `images` (None: the identity)
        self.prep = prep
        self.size = images.shape[1]
        self.generator = generator
        self.crop_pad, self.flip, self.cutout = crop_pad, flip, cutout
        n = len(rows) if rows is not None else len(images)
        self.flip_base = random_flip_mask(n, generator, prep.device) if flip == "alternate" else None
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.per_chunk = max(1, self.CHUNK_BYTES // (3 * self.size * self.size * 4))  # images per chunk
        self._steps: list[torch.Tensor] = []
        self._chunk: tuple[int, int, torch.Tensor, list[int]] | None = None  # first step, end step, images, offsets
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # uint8 and float32, reused per chunk

    def start_epoch(self, steps: list[torch.Tensor]) -> None:
        """This process's training indices for each step of the coming epoch."""
        self._steps, self._chunk = steps, None

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Normalised, unaugmented training images `idx`: (len(idx), 3, H, W) on the device, read a
        chunk at a time. A page fault on a map brings in the whole page-cache folio around it (about
        600 KB per 3 KB image on Linux 6.18), so one read of 5,000 scattered rows held 300 MB of it."""
        parts = []
        for part in idx.split(self.per_chunk):
            parts.append(self.prep(self.images[self._rows(part)]))
            self.release()
        return torch.cat(parts) if parts else self.prep(self.images[:0])

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of `images` holding training images `idx`, on the images' device."""
        rows = idx if self.rows is None else self.rows[idx.to(self.rows.device)]
        return rows.to(self.images.device)

    def _load(self, idx: torch.Tensor) -> torch.Tensor:
        """`gather`, into buffers kept from the last chunk (so its batches must be used up by now)."""
        n = len(idx)
        if self._buffers is None or len(self._buffers[0]) < n:
            shape = (max(n, self.per_chunk), self.size, self.size)
            self._buffers = (torch.empty((*shape, 3), dtype=torch.uint8, device=self.images.device),
                             torch.empty((shape[0], 3, *shape[1:]), dtype=torch.float32, device=self.prep.device))
        u8 = torch.index_select(self.images, 0, self._rows(idx), out=self._buffers[0][:n])
        self.release()  # else an epoch of random reads leaves the whole map resident
        return self.prep(u8, out=self._buffers[1][:n])

    def __call__(self, step: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the augmented batch (B, 3, H, W), its training indices (B,)) for `step` of `epoch` (0-based)."""
        idx = self._steps[step]
        x = self._normalised(step)
        if self.crop_pad:
            x = random_crop(pad_reflect(x, self.crop_pad), self.size, self.generator)
        if self.flip == "random":
            x = flip_where(x, random_flip_mask(len(idx), self.generator, x.device))
        elif self.flip_base is not None:
            x = flip_where(x, alternating_flip_mask(self.flip_base, idx.to(self.flip_base.device), epoch))
        if self.cutout:
            x = cutout(x, self.cutout, self.generator)
        return x.contiguous(memory_format=self.layout), idx

    def _normalised(self, step: int) -> torch.Tensor:
        """The step's images normalised, from the chunk that holds it (loaded when the step is past it)."""
        if self._chunk is None or not self._chunk[0] <= step < self._chunk[1]:
            end, count = step, 0
            while end < len(self._steps) and (end == step or count + len(self._steps[end]) <= self.per_chunk):
                count += len(self._steps[end])
                end += 1
            offsets = [0]
            for s in range(step, end):
                offsets.append(offsets[-1] + len(self._steps[s]))
            self._chunk = (step, end, self._load(torch.cat(self._steps[step:end])), offsets)
        first, _, images, offsets = self._chunk
        return images[offsets[step - first]:offsets[step - first + 1]]
