"""The training loop: tensor-cache data on the training device, a shuffled index per epoch,
no DataLoader, no PIL, and checkpoints that make any run resumable bit for bit."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import secrets
import signal
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cifarctl import __version__, checkpoint, fsutil
from cifarctl.averaging import Lookahead
from cifarctl.config import DownloadConfig, TrainConfig
from cifarctl import distributed
from cifarctl.data import ensure_dataset, normalise
from cifarctl.distributed import World
from cifarctl.errors import CifarctlError, UsageError
from cifarctl.metrics import evaluate
from cifarctl.models import build_model
from cifarctl.progress import Reporter
from cifarctl.weights import save_weights

# The tutorial's Normalize((0.5,)*3, (0.5,)*3): inputs scaled to [-1, 1].
TUTORIAL_MEAN = [0.5, 0.5, 0.5]
TUTORIAL_STD = [0.5, 0.5, 0.5]

WEIGHTS = "weights.safetensors"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.csv"
CONFIG = "config.json"
CURVES = "curves.png"
METRIC_FIELDS = ["kind", "epoch", "step", "images", "lr", "train_loss", "test_loss", "test_acc", "test_acc_plain",
                 "elapsed_s", "train_s", "images_per_s"]


class TrainingInterrupted(CifarctlError):
    """Ctrl-C or SIGTERM: the checkpoint is written and the message says how to resume."""


class NonFiniteLoss(CifarctlError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def resolve_device(name: str) -> torch.device:
    """Turn auto|cpu|cuda|cuda:N|mps into a usable device, or raise a usage error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("CUDA was requested (--gpu or --device cuda) but no CUDA GPU is available; "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("MPS was requested but is not available; use --device cpu")
    return device


class RunPaths:
    """The files of one run directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.weights = root / WEIGHTS
        self.checkpoint = root / CHECKPOINT
        self.metrics = root / METRICS
        self.config = root / CONFIG
        self.curves = root / CURVES


def default_output_dir(model: str, root: Path = Path("runs")) -> Path:
    """runs/<model>-<timestamp>, with a counter if two runs start in the same second."""
    base = root / f"{model}-{datetime.now():%Y%m%d-%H%M%S}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


class _Stepper:
    """Cross-entropy + torch.optim.SGD through autograd: the training step for any model, with
    optional label smoothing and bf16 autocast."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        self.model = model
        self.forward = torch.compile(model) if cfg.compile else model
        self.names = {p: n for n, p in model.named_parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        # Biases and BatchNorm shifts (the 1-d parameters) may learn faster than the weights (airbench).
        groups = [{"params": [p for p in params if p.ndim > 1], "lr_scale": 1.0},
                  {"params": [p for p in params if p.ndim <= 1], "lr_scale": cfg.bias_lr_scale}]
        self.opt = torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        self.set_lr(cfg.lr)
        self.smoothing = cfg.label_smoothing
        self.autocast = torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu",
                                       dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            loss = F.cross_entropy(self.forward(x), y, label_smoothing=self.smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach().float()

    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        """Momentum buffers by parameter name; absent before the first step."""
        return {self.names[p]: s["momentum_buffer"] for p, s in self.opt.state.items()
                if s.get("momentum_buffer") is not None}

    def load_momentum_buffers(self, bufs: dict[str, torch.Tensor]) -> None:
        """Restore buffers saved by `momentum_buffers`."""
        for p, name in self.names.items():
            if name in bufs:
                self.opt.state[p]["momentum_buffer"] = bufs[name].to(p.device, p.dtype).clone()

    def set_lr(self, lr: float) -> None:
        """Change the learning rate of every parameter group."""
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]


def _fused_tutorial_ok(cfg: TrainConfig, device: torch.device) -> bool:
    """The hand-written CPU step covers exactly the tutorial recipe: plain SGD, no extras."""
    return (cfg.model == "tutorial" and device.type == "cpu" and not cfg.nesterov and cfg.label_smoothing == 0
            and cfg.schedule == "constant" and cfg.precision == "fp32" and not cfg.compile and not cfg.channels_last)


def _make_stepper(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, world: World):
    if world.enabled:
        from torch.nn.parallel import DistributedDataParallel

        stepper = _Stepper(model, cfg, device)
        # DDP all-reduces (averages) gradients during backward; the optimizer sees the global mean.
        stepper.forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return stepper
    if _fused_tutorial_ok(cfg, device):
        from cifarctl.fast_tutorial import TutorialSGDStep

        # At batch 4 a second thread only adds synchronisation: the step is faster on one.
        torch.set_num_threads(1)
        return TutorialSGDStep(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    return _Stepper(model, cfg, device)


def lr_at(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate for 0-based global `step`: constant, or onecycle (linear warm-up, linear decay to 0)."""
    if cfg.schedule == "constant":
        return cfg.lr
    warm = max(int(cfg.warmup_epochs * steps_per_epoch), 1)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(total_steps - step, 0) / max(total_steps - warm, 1)


def model_config(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The constructor arguments stored in the weights, from which the model is rebuilt."""
    out: dict[str, Any] = {"num_classes": num_classes}
    if cfg.width:
        if cfg.model != "fast":
            raise UsageError("--width applies to --model fast only")
        try:
            out["widths"] = [int(w) for w in cfg.width.split(",")]
        except ValueError as err:
            raise UsageError(f"--width takes comma-separated integers like 32,96,192, not {cfg.width!r}") from err
    return out


NORMALIZATION = {
    "tutorial": (TUTORIAL_MEAN, TUTORIAL_STD),
    # Per-channel mean and std of the CIFAR-10 training images.
    "dataset": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}


@contextmanager
def _stop_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
    caught: list[int] = []
    handlers = {}

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        caught.append(signum)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield caught
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fsutil.write_text(path, buf.getvalue())


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and test accuracy against training steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [r for r in rows if r["kind"] == "log" and r["train_loss"] not in ("", None)]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
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
    with fsutil.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _configure_cpu() -> None:
    """Flush denormal floats to zero: tiny gradients and momentum values late in training otherwise
    fall into the CPU's slow path for subnormal numbers (seen here: an epoch 4x slower)."""
    torch.set_flush_denormal(True)


def _configure_determinism(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def _batch_source(cfg: TrainConfig, train_x: torch.Tensor, augment: torch.Generator):
    """A function (idx, epoch) -> augmented batch, built once per run: crops come from a copy of the
    training set padded once up front, flips and cutout are drawn on the device."""
    from cifarctl import augment as aug

    source = aug.pad_reflect(train_x, cfg.crop_pad) if cfg.crop_pad else train_x
    flip_base = aug.random_flip_mask(len(train_x), augment, train_x.device) if cfg.flip == "alternate" else None
    if cfg.flip not in ("none", "random", "alternate"):
        raise UsageError(f"--flip must be none, random or alternate, not {cfg.flip!r}")
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def batch(idx: torch.Tensor, epoch: int) -> torch.Tensor:
        x = source[idx]
        if cfg.crop_pad:
            x = aug.random_crop(x, 32, augment)
        if cfg.flip == "random":
            x = aug.flip_where(x, aug.random_flip_mask(len(idx), augment, x.device))
        elif flip_base is not None:
            x = aug.flip_where(x, aug.alternating_flip_mask(flip_base, idx, epoch))
        if cfg.cutout:
            x = aug.cutout(x, cfg.cutout, augment)
        return x.contiguous(memory_format=layout)

    return batch, flip_base


def train(cfg: TrainConfig, reporter: Reporter, resume: Path | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns a JSON-able summary. Raises CifarctlError subclasses.

    Under torchrun (WORLD_SIZE > 1) every process calls this; rank 0 alone reports and writes files.
    """
    world = distributed.world_from_env()
    if not world.enabled:
        return _train(cfg, reporter, resume, overrides, world)
    try:
        return _train(cfg, reporter if world.is_main else Reporter(), resume, overrides, world)
    except (RuntimeError, torch.distributed.DistBackendError) as err:
        raise distributed.collective_error(err) from err
    finally:
        distributed.shutdown()


def _train(cfg: TrainConfig, reporter: Reporter, resume: Path | None, overrides: dict[str, Any] | None,
           world: World) -> dict[str, Any]:
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    state = None
    if resume is not None:
        resume = Path(resume)
        if resume.name == CHECKPOINT:
            resume = resume.parent
        tensors, meta = checkpoint.load(resume / CHECKPOINT)
        saved = TrainConfig.from_json(meta["config"])
        fixed = {k for k, v in overrides.items()
                 if k in ("model", "batch_size", "seed", "width", "lookahead") and v != getattr(saved, k)}
        if fixed:
            raise UsageError(f"--resume cannot change {', '.join(sorted(fixed))}; start a new run instead")
        for key, value in overrides.items():
            setattr(saved, key, value)
        cfg = saved
        cfg.output_dir = resume
        state = (tensors, meta)
    elif cfg.seed is None:
        cfg.seed = secrets.randbelow(2**31)
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.lr <= 0:
        raise UsageError("--batch-size and --epochs must be at least 1 and --lr positive")
    if cfg.normalization not in NORMALIZATION:
        raise UsageError(f"--normalization must be one of {', '.join(NORMALIZATION)}")
    if cfg.precision not in ("fp32", "bf16"):
        raise UsageError("--precision must be fp32 or bf16")
    device = resolve_device(cfg.device)
    if world.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        distributed.init(world, device.type, cfg.dist_timeout)
    _configure_determinism(cfg.deterministic)
    if device.type == "cpu":
        _configure_cpu()
    _seed_everything(cfg.seed)

    ds = ensure_dataset(DownloadConfig(data_dir=cfg.data_dir), reporter)
    mean, std = NORMALIZATION[cfg.normalization]
    # bf16 runs keep the normalised set in bf16 too: half the memory traffic per gathered batch.
    store = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    train_x = normalise(ds.train.images, mean, std, device).to(store)  # (N, 3, 32, 32)
    train_y = ds.train.labels.to(device)  # (N,) int64
    test_x = normalise(ds.test.images, mean, std, device).to(store)
    test_y = ds.test.labels.to(device)
    num_classes = len(ds.class_names)

    mconfig = model_config(cfg, num_classes)
    model = build_model(cfg.model, mconfig).to(device)
    if hasattr(model, "init_whitening") and state is None:
        # A few thousand images pin down a 12x12 patch covariance; the seeded perm makes it repeatable.
        model.init_whitening(train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))
                                     [:5000].to(device)])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stepper = _make_stepper(model, cfg, device, world)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    augment = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    generators = {"shuffle": shuffle, "augment": augment}
    next_batch, flip_base = _batch_source(cfg, train_x, augment)  # flip_base: the same on every rank
    if world.rank:
        augment.manual_seed(cfg.seed + 1 + 1_000_003 * world.rank)  # other ranks draw other crops and flips

    root = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.model)
    if world.enabled:
        root = Path(distributed.broadcast_text(str(root)))  # the timestamped default differs per rank
    out = RunPaths(root)
    if world.is_main:
        out.root.mkdir(parents=True, exist_ok=True)
    n = len(train_y)
    global_batch = cfg.batch_size * world.size  # each rank takes batch_size images of every global batch
    steps_per_epoch = math.ceil(n / global_batch)
    total_steps = steps_per_epoch * cfg.epochs
    lookahead = Lookahead(model, total_steps) if cfg.lookahead else None
    start_epoch, start_step, elapsed = 0, 0, 0.0
    perm = None
    rows = _read_metrics(out.metrics) if state else []
    if state:
        tensors, meta = state
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        stepper.load_momentum_buffers({k[len("momentum."):]: v for k, v in tensors.items()
                                       if k.startswith("momentum.")})
        checkpoint.set_rng_state(tensors, meta["rng"], generators)
        if lookahead is not None:
            lookahead.load_state_dict({k[len("lookahead."):]: v for k, v in tensors.items()
                                       if k.startswith("lookahead.")})
        if flip_base is not None:
            flip_base.copy_(tensors["flip_base"])
        start_epoch, start_step, elapsed = meta["epoch"], meta["step"], meta["elapsed_s"]
        perm = tensors["perm"].to(device) if start_step else None
        rows = [r for r in rows if int(r["step"]) <= start_epoch * steps_per_epoch + start_step]
        reporter.log(f"resuming {out.root} at epoch {start_epoch + 1}, step {start_step}")
    if world.is_main:
        fsutil.write_text(out.config, json.dumps(
            {**cfg.to_json(), "device_resolved": str(device), "world_size": world.size,
             "cifarctl_version": __version__, "torch_version": torch.__version__}, indent=2) + "\n")
        _point_latest(out.root)

    def weights_meta(epoch: int, ev, ev_plain) -> dict[str, Any]:
        return {"model": cfg.model, "model_config": mconfig, "class_names": ds.class_names,
                "mean": mean, "std": std, "epochs": str(epoch), "test_accuracy": f"{ev.accuracy:.6f}",
                "test_accuracy_plain": f"{ev_plain.accuracy:.6f}", "tta": cfg.tta if ev is not ev_plain else "none",
                "precision": cfg.precision,
                "seed": str(cfg.seed), "cifarctl_version": __version__, "torch_version": torch.__version__,
                "train_config": cfg.to_json()}

    def save_checkpoint(epoch: int, step: int, perm_now: torch.Tensor | None) -> None:
        rng_tensors, rng_values = checkpoint.rng_state(generators)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"momentum.{k}": v for k, v in stepper.momentum_buffers().items()})
        tensors.update(rng_tensors)
        if lookahead is not None:
            tensors.update({f"lookahead.{k}": v for k, v in lookahead.state_dict().items()})
        if perm_now is not None:
            tensors["perm"] = perm_now
        if flip_base is not None:
            tensors["flip_base"] = flip_base
        meta = {"epoch": epoch, "step": step, "elapsed_s": elapsed + (time.perf_counter() - t_start),
                "config": cfg.to_json(), "rng": rng_values}
        checkpoint.save(out.checkpoint, tensors, meta)

    last = [r for r in rows if r["kind"] == "epoch"]
    accuracy = float(last[-1]["test_acc"]) if last else float("nan")
    accuracy_plain = float(last[-1].get("test_acc_plain") or accuracy) if last else float("nan")
    log_every = max(cfg.log_every, 1)
    ui_every = max(1, min(log_every, 200))  # progress updates: cheap, but not free at batch 4
    train_time = 0.0
    trained_images = 0
    t_start = time.perf_counter()
    model.train()
    with _stop_signals() as caught:
        for epoch in range(start_epoch, cfg.epochs):
            if perm is None:
                perm = torch.randperm(n, generator=shuffle).to(device)
            running = torch.zeros((), device=device)
            since_log = 0
            t_epoch = time.perf_counter()
            with reporter.task(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch) as task:
                task.update(start_step)
                for i in range(start_step, steps_per_epoch):
                    global_step = epoch * steps_per_epoch + i
                    if cfg.schedule != "constant":
                        stepper.set_lr(lr_at(cfg, global_step, total_steps, steps_per_epoch))
                    idx = perm[i * global_batch:(i + 1) * global_batch]
                    if world.enabled:
                        idx = distributed.shard(idx, world)
                    loss = stepper(next_batch(idx, epoch), train_y[idx])
                    if lookahead is not None:
                        lookahead.after_step(global_step + 1)
                    running += loss
                    since_log += 1
                    if device.type == "cpu" and not math.isfinite(loss.item()):
                        _fail_non_finite(epoch, i, out)
                    # Ranks must agree on the step they stop at, or one would wait forever in all-reduce.
                    if (distributed.any_rank(bool(caught), device) if world.enabled else caught):
                        if world.is_main:
                            save_checkpoint(epoch, i + 1, perm)
                        raise _interrupted(caught[0] if caught else signal.SIGTERM, out.root)
                    if (i + 1) % ui_every == 0 or i + 1 == steps_per_epoch:
                        done = i + 1 - start_step
                        rate = done * global_batch / max(time.perf_counter() - t_epoch, 1e-9)
                        task.update(i + 1, imgs_s=f"{rate:,.0f} img/s")
                    if (i + 1) % log_every == 0:
                        value = float(running) / since_log  # the one host sync per log interval
                        if not math.isfinite(value):
                            _fail_non_finite(epoch, i, out)
                        task.update(loss=f"loss {value:.3f}")
                        reporter.log(f"[{epoch + 1}, {i + 1:5d}] loss: {value:.3f}")
                        rows.append({"kind": "log", "epoch": epoch + 1, "step": global_step + 1,
                                     "images": min((global_step + 1) * global_batch, (epoch + 1) * n),
                                     "train_loss": f"{value:.5f}", "lr": f"{stepper_lr(stepper, cfg):.6g}",
                                     "elapsed_s": f"{elapsed + time.perf_counter() - t_start:.2f}"})
                        running.zero_()
                        since_log = 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.perf_counter() - t_epoch
            epoch_images = n - min(start_step * global_batch, n)
            train_time += epoch_time
            trained_images += epoch_images
            if since_log and not math.isfinite(float(running)):
                _fail_non_finite(epoch, steps_per_epoch - 1, out)
            if not world.is_main:
                distributed.barrier()  # rank 0 evaluates every test image once and writes the files
                start_step, perm = 0, None
                continue
            bf16 = cfg.precision == "bf16"
            ev_plain = evaluate(model, test_x, test_y, num_classes, bf16=bf16)
            # TTA costs a forward pass per view: measure it on the final epoch only.
            final = epoch + 1 == cfg.epochs
            ev = evaluate(model, test_x, test_y, num_classes, tta=cfg.tta, bf16=bf16) \
                if cfg.tta != "none" and final else ev_plain
            accuracy, accuracy_plain = ev.accuracy, ev_plain.accuracy
            rows.append({"kind": "epoch", "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                         "images": (epoch + 1) * n, "test_loss": f"{ev.loss:.5f}", "test_acc": f"{accuracy:.5f}",
                         "test_acc_plain": f"{accuracy_plain:.5f}",
                         "elapsed_s": f"{elapsed + time.perf_counter() - t_start:.2f}",
                         "train_s": f"{epoch_time:.2f}", "images_per_s": f"{epoch_images / epoch_time:.1f}"})
            tta_note = f", {100 * accuracy:.2f}% with {cfg.tta} TTA" if ev is not ev_plain else ""
            reporter.log(f"epoch {epoch + 1}: test accuracy {100 * accuracy_plain:.2f}%{tta_note}  "
                         f"(loss {ev.loss:.3f}, {epoch_time:.1f} s)")
            start_step, perm = 0, None
            save_weights(out.weights, model.state_dict(), weights_meta(epoch + 1, ev, ev_plain))
            save_checkpoint(epoch + 1, 0, None)
            _write_metrics(out.metrics, rows)
            if world.enabled:
                distributed.barrier()
    total = elapsed + time.perf_counter() - t_start
    if world.is_main:
        plot_curves(rows, out.curves, f"{cfg.model}: {100 * accuracy:.2f}% test accuracy")
    return {
        "run_dir": str(out.root),
        "weights": str(out.weights),
        "model": cfg.model,
        "epochs": cfg.epochs,
        "test_accuracy": accuracy,
        "test_accuracy_plain": accuracy_plain,
        "tta": cfg.tta,
        "time_s": round(total, 2),
        "train_time_s": round(train_time, 2),
        "images_per_s": round(trained_images / train_time, 1) if train_time else None,
        "device": str(device),
        "world_size": world.size,
        "seed": cfg.seed,
        "files": {name: str(getattr(out, name)) for name in ("weights", "checkpoint", "metrics", "config", "curves")},
    }


def stepper_lr(stepper, cfg: TrainConfig) -> float:
    """The learning rate in use now (the fused tutorial step has a fixed one)."""
    opt = getattr(stepper, "opt", None)
    return opt.param_groups[0]["lr"] / opt.param_groups[0]["lr_scale"] if opt is not None else cfg.lr


def _point_latest(run_dir: Path) -> None:
    """runs/latest -> the newest run, so evaluate and predict can default to it."""
    try:
        fsutil.point_symlink(run_dir.parent / "latest", run_dir)
    except OSError:
        pass  # filesystems without symlinks: the run is still complete


def _fail_non_finite(epoch: int, i: int, out: RunPaths) -> None:
    kept = "the weights and checkpoint from the last finished epoch are kept" if out.weights.exists() \
        else "no weights were saved"
    raise NonFiniteLoss(f"loss became NaN or infinite at epoch {epoch + 1}, step {i + 1}; {kept}. "
                        "Lower --lr and start again (or --resume with a lower --lr)")


def _interrupted(signum: int, run_dir: Path) -> TrainingInterrupted:
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    return TrainingInterrupted(f"{name}: stopped and saved a checkpoint; resume with: "
                               f"cifarctl train --resume {run_dir}", exit_code=128 + signum)
