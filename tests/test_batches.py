"""Training batches read per batch from uint8 images: the same bits as the whole-set pipeline
they replaced, resident memory that does not grow with the dataset, and DDP ranks that read only
their shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarctl import augment as aug
from cifarctl import data, distributed

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def whole_set_batches(images: torch.Tensor, steps: list[torch.Tensor], epoch: int, seed: int, store: torch.dtype,
                      pad: int, flip: str, cut: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The pipeline before batches were read per batch, written out as it was: normalise every
    image into one float copy, pad the whole copy once, then crop, flip and cut out each batch."""
    if rows is not None:
        images = images[rows]
    x = images.permute(0, 3, 1, 2).float()
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    source = ((x / 255 - m) / s).to(store)
    if pad:
        source = F.pad(source.float(), (pad,) * 4, mode="reflect").to(store)
    g = torch.Generator().manual_seed(seed)
    base = aug.random_flip_mask(len(images), g, torch.device("cpu")) if flip == "alternate" else None
    out = []
    for idx in steps:
        b = source[idx]
        if pad:
            b = aug.random_crop(b, images.shape[1], g)
        if flip == "random":
            b = aug.flip_where(b, aug.random_flip_mask(len(idx), g, b.device))
        elif base is not None:
            b = aug.flip_where(b, aug.alternating_flip_mask(base, idx, epoch))
        if cut:
            b = aug.cutout(b, cut, g)
        out.append(b)
    return out


@pytest.mark.parametrize(("store", "pad", "flip", "cut", "batch", "size", "held"), [
    (torch.float32, 2, "alternate", 0, 64, 32, False),
    (torch.bfloat16, 4, "random", 8, 50, 32, False),
    (torch.float32, 0, "none", 0, 4, 32, False),
    (torch.float32, 4, "alternate", 12, 30, 64, True),
])
def test_per_batch_pipeline_is_bit_identical_to_the_whole_set_one(store, pad, flip, cut, batch, size, held) -> None:
    """Same seed, same batches, bit for bit: normalising, padding and cropping per batch (in chunks
    of several steps, the last one partial) changes nothing, at 32x32 and 64x64, with a held-out split."""
    n = 300
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    rows = torch.arange(0, n, 3) if held else None
    count = len(rows) if held else n
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(5))
    steps = list(perm.split(batch))
    for epoch in (0, 1):
        expected = whole_set_batches(images, steps, epoch, seed=7, store=store, pad=pad, flip=flip, cut=cut, rows=rows)
        batches = aug.TrainBatches(images, aug.Preprocess(MEAN, STD, "cpu", store), torch.Generator().manual_seed(7),
                                   rows=rows, crop_pad=pad, flip=flip, cutout=cut)
        batches.per_chunk = 3 * batch + 1  # several steps per chunk, and chunks that end mid-epoch
        batches.start_epoch(steps)
        for i, want in enumerate(expected):
            got, idx = batches(i, epoch)
            assert torch.equal(idx, steps[i])
            assert got.dtype == store and torch.equal(got, want), f"epoch {epoch} step {i}"


def test_evaluation_normalises_per_batch_like_the_whole_set() -> None:
    """Scoring uint8 images through Preprocess gives the logits of the whole set normalised first."""
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    from cifarctl.metrics import logits

    prep = aug.Preprocess(MEAN, STD, "cpu")
    whole = logits(model, aug.normalise(images, MEAN, STD, "cpu"), batch_size=32, tta="flip")
    assert torch.equal(logits(model, images, batch_size=32, tta="flip", prep=prep), whole)
    assert torch.equal(logits(model, aug.Rows(images, torch.arange(0, 70, 2)), batch_size=16, prep=prep),
                       logits(model, aug.normalise(images[::2], MEAN, STD, "cpu"), batch_size=16))


_MEASURE = textwrap.dedent("""
    import json, sys, torch
    from cifarctl import augment as aug
    from cifarctl.data import load_dataset
    from cifarctl.metrics import evaluate

    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    torch.set_num_threads(1)
    ds = load_dataset(sys.argv[1], sys.argv[2])
    before, peak = anon_kb(), 0
    prep = aug.Preprocess([0.5] * 3, [0.25] * 3, "cpu")
    batches = aug.TrainBatches(ds.train.images, prep, torch.Generator().manual_seed(0), crop_pad=2, flip="alternate")
    batches.start_epoch(list(torch.randperm(len(ds.train)).split(64)))
    for i in range(len(batches._steps)):
        batches(i, 0)
        peak = max(peak, anon_kb())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    evaluate(model, ds.test.images, ds.test.labels, 10, batch_size=500, prep=prep)
    peak = max(peak, anon_kb())
    print(json.dumps({"growth_kb": peak - before}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_memory_does_not_grow_with_dataset_size(tmp_path: Path) -> None:
    """An epoch of batches plus a test pass over a 10x larger dataset grows anonymous memory by
    about the same as over the small one (a float copy of the large set alone would be 250 MB)."""
    growth = {}
    for n in (2_000, 20_000):
        rng = np.random.default_rng(n)
        arrays = {"train_images": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                  "train_labels": np.arange(n, dtype=np.int64) % 10,
                  "test_images": rng.integers(0, 256, (n // 4, 32, 32, 3), dtype=np.uint8),
                  "test_labels": np.arange(n // 4, dtype=np.int64) % 10}
        data.save_cache(tmp_path, f"n{n}", arrays, [str(c) for c in range(10)])
        del arrays
        # Large blocks straight from mmap: freed ones go back at once, so the allocator's reuse
        # pattern does not blur the peak.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), f"n{n}"], capture_output=True, text=True,
                             check=True, env=env).stdout
        growth[n] = json.loads(out)["growth_kb"] / 1024
    assert growth[20_000] < growth[2_000] + 10, growth  # MB; the uint8 images alone differ by 69 MB


def test_each_rank_reads_only_its_shard_of_every_global_batch() -> None:
    """Under DDP a rank gathers just its slice of each global batch from the images, and the ranks
    together cover every image of the epoch exactly once."""
    n, global_batch, size = 103, 16, 3

    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
    read: dict[int, list[int]] = {}

    class Recorded(torch.Tensor):
        """The images, noting every row that is read from them (torch.index_select is the one read)."""

        rank = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.index_select:
                read.setdefault(cls.rank, []).extend(args[2].tolist())
            return super().__torch_function__(func, types, args, kwargs or {})

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for rank in range(size):
        world = distributed.World(rank, size, rank)
        steps = [distributed.shard(idx, world) for idx in perm.split(global_batch)]
        Recorded.rank = rank
        batches = aug.TrainBatches(images.as_subclass(Recorded), aug.Preprocess(MEAN, STD, "cpu"),
                                   torch.Generator().manual_seed(0))
        batches.start_epoch(steps)
        for i in range(len(steps)):
            x, idx = batches(i, 0)
            assert torch.equal(idx, perm[i * global_batch:(i + 1) * global_batch].tensor_split(size)[rank])
            assert torch.equal(x.as_subclass(torch.Tensor), aug.normalise(images[idx], MEAN, STD, "cpu"))
    assert all(len(read[r]) < n // 2 for r in range(size))
    assert sorted(sum(read.values(), [])) == list(range(n))
