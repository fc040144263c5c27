"""What keeps a training process small: the CPU SGD loop, the max-pool that saves only its indices,
the cache pages handed back as batches are read, and no torch._dynamo in a plain run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarctl import augment as aug
from cifarctl import data
from cifarctl.models import MaxPool2, build_model
from cifarctl.steppers import CpuSGD


@pytest.mark.parametrize("momentum, weight_decay, nesterov", [(0.9, 5e-4, True), (0.9, 0.0, False), (0.0, 5e-4, False)])
def test_cpu_sgd_updates_bit_for_bit_like_torch_optim_sgd(momentum: float, weight_decay: float, nesterov: bool) -> None:
    """The CPU SGD loop gives torch.optim.SGD's parameters and momentum buffers exactly, per-group
    learning rates and parameters without a gradient included."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen), torch.randn(2, generator=gen)]
    ours, theirs = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    groups = lambda ps: [{"params": ps[:1], "lr_scale": 1.0}, {"params": ps[1:], "lr_scale": 16.0}]  # noqa: E731
    opt_ours = CpuSGD(groups(ours), 0.1, momentum, weight_decay, nesterov)
    opt_theirs = torch.optim.SGD(groups(theirs), lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    for opt in (opt_ours, opt_theirs):
        opt.param_groups[1]["lr"] = 1.6
    for _ in range(4):
        grads = [torch.randn(t.shape, generator=gen) for t in start[:2]]  # the last parameter gets no gradient
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    for a, b in zip(ours, theirs):
        assert (opt_ours.state[a].get("momentum_buffer") is None) == (opt_theirs.state[b].get("momentum_buffer") is None)
        if momentum:
            assert torch.equal(opt_ours.state[a].get("momentum_buffer", torch.zeros(0)),
                               opt_theirs.state[b].get("momentum_buffer", torch.zeros(0)))


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(bytes autograd keeps for backward, loss) of one forward pass."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), torch.arange(len(x)) % 10)
    return sum(storages.values()), loss


def test_fast_model_max_pool_saves_only_indices_with_the_same_gradients() -> None:
    """Training the fast model keeps less for backward than nn.MaxPool2d would (not the conv
    outputs before the pools), and every gradient is the same bit for bit."""
    torch.manual_seed(0)
    ours = build_model("fast", {"widths": [8, 16, 16]})
    plain = build_model("fast", {"widths": [8, 16, 16]})
    plain.load_state_dict(ours.state_dict())
    plain.body = torch.nn.Sequential(*(torch.nn.MaxPool2d(2) if isinstance(m, MaxPool2) else m for m in plain.body))
    x = torch.randn(32, 3, 32, 32)
    (kept, loss), (kept_plain, loss_plain) = _saved_bytes(ours, x), _saved_bytes(plain, x)
    conv_outputs = 32 * 4 * (8 * 31 * 31 + 16 * 15 * 15 + 16 * 7 * 7)  # float32 before each of the three pools
    assert kept <= kept_plain - conv_outputs
    loss.backward()
    loss_plain.backward()
    assert torch.equal(loss, loss_plain)
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's maps of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and fields[0][0] in "0123456789abcdef":
            inside = len(fields) >= 6 and fields[-1] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_reading_a_cache_leaves_its_pages_resident_until_released(tmp_path: Path) -> None:
    """After a pass over every image the cache is resident in the reader; releasing the pages
    drops them from its memory, and the images read the same afterwards. Computing the channel
    statistics reads every image too and leaves no more than a chunk behind."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)  # 6 MB
    arrays = {"train_images": images, "train_labels": np.arange(2000, dtype=np.int64) % 10,
              "test_images": images[:10], "test_labels": np.arange(10, dtype=np.int64)}
    data.save_cache(tmp_path, "pages", arrays, [str(c) for c in range(10)])
    ds = data.load_dataset(tmp_path, "pages")
    path = data.cache_path(tmp_path, "pages").resolve()
    total = int(ds.train.images.sum())  # touches every page
    assert _mapped_kib(path) > 5000
    ds.release_pages()
    assert _mapped_kib(path) < 100
    assert int(ds.train.images.sum()) == total == int(images.sum(dtype=np.int64))
    ds.release_pages()
    unrecorded = dataclasses.replace(ds, metadata={})  # a cache from before mean/std were recorded
    assert data.dataset_stats(unrecorded) == data.dataset_stats(ds)  # computed over every image ...
    assert _mapped_kib(path) < 1000  # ... and handed back a chunk at a time


def test_batches_hand_the_pages_back_after_every_chunk() -> None:
    """Training batches call `release` once per chunk of steps they read, so an epoch of random
    reads never leaves the whole map resident."""
    images = torch.zeros(100, 8, 8, 3, dtype=torch.uint8)
    calls = []
    batches = aug.TrainBatches(images, aug.Preprocess([0.5] * 3, [0.25] * 3, "cpu"),
                               torch.Generator().manual_seed(0), release=lambda: calls.append(1))
    batches.per_chunk = 30
    batches.start_epoch(list(torch.randperm(100).split(10)))
    for step in range(10):
        batches(step, 0)
    assert len(calls) == 4  # chunks of 3, 3, 3 and 1 steps


_TRAIN_AND_LIST_MODULES = textwrap.dedent("""
    import atexit, json, runpy, sys
    # At exit, which cifarctl reaches through its atexit handlers (it skips the rest of the teardown).
    atexit.register(lambda: print(json.dumps(sorted(m for m in sys.modules
                                                    if m.startswith(("torch._dynamo", "torch._inductor"))))))
    sys.argv = ["cifarctl", "train", *sys.argv[1:]]
    runpy.run_module("cifarctl", run_name="__main__")
""")


def test_a_cpu_training_run_never_imports_the_compiler(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A CPU run of the fast model with --deterministic trains without importing torch._dynamo or
    torch._inductor (150 MB of resident memory and over a second of start-up)."""
    out = subprocess.run([sys.executable, "-c", _TRAIN_AND_LIST_MODULES, "--data-dir", str(tiny_data_dir),
                          "-o", str(tmp_path / "run"), "--model", "fast", "--width", "8,16,16", "--epochs", "1",
                          "--deterministic", "--device", "cpu", "--tta", "none", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
