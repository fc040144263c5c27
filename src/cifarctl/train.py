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
from cifarctl.config import DownloadConfig, TrainConfig
from cifarctl.data import ensure_dataset, normalise
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
METRIC_FIELDS = ["kind", "epoch", "step", "images", "train_loss", "test_loss", "test_acc", "elapsed_s",
                 "images_per_s"]


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
    """Cross-entropy + torch.optim.SGD, the generic training step for any model."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        self.model = model
        self.names = {p: n for n, p in model.named_parameters()}
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.detach()

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
            group["lr"] = lr


def _make_stepper(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    return _Stepper(model, cfg)


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


def _configure_determinism(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def train(cfg: TrainConfig, reporter: Reporter, resume: Path | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns a JSON-able summary. Raises CifarctlError subclasses."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    state = None
    if resume is not None:
        resume = Path(resume)
        if resume.name == CHECKPOINT:
            resume = resume.parent
        tensors, meta = checkpoint.load(resume / CHECKPOINT)
        saved = TrainConfig.from_json(meta["config"])
        fixed = {k: v for k, v in overrides.items() if k in ("model", "batch_size", "seed") and v != getattr(saved, k)}
        if fixed:
            raise UsageError(f"--resume cannot change {', '.join(fixed)}; start a new run instead")
        for key, value in overrides.items():
            if key not in ("output_dir",):
                setattr(saved, key, value)
        cfg = saved
        cfg.output_dir = resume
        state = (tensors, meta)
    else:
        if cfg.seed is None:
            cfg.seed = secrets.randbelow(2**31)
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.lr <= 0:
        raise UsageError("--batch-size and --epochs must be at least 1 and --lr positive")
    device = resolve_device(cfg.device)
    _configure_determinism(cfg.deterministic)
    _seed_everything(cfg.seed)

    ds = ensure_dataset(DownloadConfig(data_dir=cfg.data_dir), reporter)
    mean, std = TUTORIAL_MEAN, TUTORIAL_STD
    train_x = normalise(ds.train.images, mean, std, device)  # (N, 3, 32, 32) float32
    train_y = ds.train.labels.to(device)  # (N,) int64
    test_x = normalise(ds.test.images, mean, std, device)
    test_y = ds.test.labels.to(device)
    num_classes = len(ds.class_names)

    model_config = {"num_classes": num_classes}
    model = build_model(cfg.model, model_config).to(device)
    stepper = _make_stepper(model, cfg, device)
    shuffle = torch.Generator().manual_seed(cfg.seed)

    out = RunPaths(Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.model))
    out.root.mkdir(parents=True, exist_ok=True)
    n = len(train_y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    start_epoch, start_step, elapsed = 0, 0, 0.0
    perm = None
    rows = _read_metrics(out.metrics) if state else []
    if state:
        tensors, meta = state
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        stepper.load_momentum_buffers({k[len("momentum."):]: v for k, v in tensors.items()
                                       if k.startswith("momentum.")})
        checkpoint.set_rng_state(tensors, meta["rng"], shuffle)
        start_epoch, start_step, elapsed = meta["epoch"], meta["step"], meta["elapsed_s"]
        perm = tensors["perm"] if start_step else None
        if start_step >= steps_per_epoch:
            start_epoch, start_step, perm = start_epoch + 1, 0, None
        reporter.log(f"resuming {out.root} at epoch {start_epoch + 1}, step {start_step}")
    if "lr" in overrides:
        stepper.set_lr(cfg.lr)
    fsutil.write_text(out.config, json.dumps(
        {**cfg.to_json(), "device_resolved": str(device), "cifarctl_version": __version__,
         "torch_version": torch.__version__}, indent=2) + "\n")
    _point_latest(out.root)

    def weights_meta(epoch: int, accuracy: float) -> dict[str, Any]:
        return {"model": cfg.model, "model_config": model_config, "class_names": ds.class_names,
                "mean": mean, "std": std, "epochs": str(epoch), "test_accuracy": f"{accuracy:.6f}",
                "seed": str(cfg.seed), "cifarctl_version": __version__, "torch_version": torch.__version__,
                "train_config": cfg.to_json()}

    def save_checkpoint(epoch: int, step: int, perm_now: torch.Tensor | None) -> None:
        rng_tensors, rng_values = checkpoint.rng_state(shuffle)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"momentum.{k}": v for k, v in stepper.momentum_buffers().items()})
        tensors.update(rng_tensors)
        if perm_now is not None:
            tensors["perm"] = perm_now
        meta = {"epoch": epoch, "step": step, "elapsed_s": elapsed + (time.perf_counter() - t_start),
                "config": cfg.to_json(), "rng": rng_values}
        checkpoint.save(out.checkpoint, tensors, meta)

    accuracy = float(rows[-1]["test_acc"]) if rows and rows[-1]["kind"] == "epoch" else float("nan")
    log_every = max(cfg.log_every, 1)
    ui_every = max(1, min(log_every, 200))  # progress updates: cheap, but not free at batch 4
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
                    idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                    loss = stepper(train_x[idx], train_y[idx])
                    running += loss
                    since_log += 1
                    if device.type == "cpu" and not math.isfinite(loss.item()):
                        _fail_non_finite(epoch, i, out)
                    if caught:
                        save_checkpoint(epoch, i + 1, perm)
                        raise _interrupted(caught[0], out.root)
                    if (i + 1) % ui_every == 0 or i + 1 == steps_per_epoch:
                        done = i + 1 - start_step
                        rate = done * cfg.batch_size / max(time.perf_counter() - t_epoch, 1e-9)
                        task.update(i + 1, imgs_s=f"{rate:,.0f} img/s")
                    if (i + 1) % log_every == 0:
                        value = float(running) / since_log  # the one host sync per log interval
                        if not math.isfinite(value):
                            _fail_non_finite(epoch, i, out)
                        task.update(loss=f"loss {value:.3f}")
                        reporter.log(f"[{epoch + 1}, {i + 1:5d}] loss: {value:.3f}")
                        rows.append({"kind": "log", "epoch": epoch + 1, "step": epoch * steps_per_epoch + i + 1,
                                     "images": (epoch * steps_per_epoch + i + 1) * cfg.batch_size,
                                     "train_loss": f"{value:.5f}",
                                     "elapsed_s": f"{elapsed + time.perf_counter() - t_start:.2f}"})
                        running.zero_()
                        since_log = 0
            train_time = time.perf_counter() - t_epoch
            if since_log and not math.isfinite(float(running)):
                _fail_non_finite(epoch, steps_per_epoch - 1, out)
            ev = evaluate(model, test_x, test_y, num_classes)
            accuracy = ev.accuracy
            rows.append({"kind": "epoch", "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                         "images": (epoch + 1) * n, "test_loss": f"{ev.loss:.5f}",
                         "test_acc": f"{accuracy:.5f}", "elapsed_s": f"{elapsed + time.perf_counter() - t_start:.2f}",
                         "images_per_s": f"{(steps_per_epoch - start_step) * cfg.batch_size / train_time:.1f}"})
            reporter.log(f"epoch {epoch + 1}: test accuracy {100 * accuracy:.2f}%  "
                         f"(loss {ev.loss:.3f}, {train_time:.1f} s)")
            start_step, perm = 0, None
            save_weights(out.weights, model.state_dict(), weights_meta(epoch + 1, accuracy))
            save_checkpoint(epoch + 1, 0, None)
            _write_metrics(out.metrics, rows)
    total = elapsed + time.perf_counter() - t_start
    plot_curves(rows, out.curves, f"{cfg.model}: {100 * accuracy:.2f}% test accuracy")
    train_rows = [r for r in rows if r["kind"] == "epoch" and r.get("images_per_s")]
    return {
        "run_dir": str(out.root),
        "weights": str(out.weights),
        "model": cfg.model,
        "epochs": cfg.epochs,
        "test_accuracy": accuracy,
        "time_s": round(total, 2),
        "images_per_s": round(float(np.mean([float(r["images_per_s"]) for r in train_rows])), 1)
        if train_rows else None,
        "device": str(device),
        "seed": cfg.seed,
        "files": {name: str(getattr(out, name)) for name in ("weights", "checkpoint", "metrics", "config", "curves")},
    }


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
