"""The training loop: tensor-cache data on the training device, a shuffled index per epoch,
no DataLoader, no PIL, and checkpoints that make any run resumable bit for bit.

`train` reads top to bottom as its phases: resolve the config, set up data and model, restore a
checkpoint, then run and end each epoch.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import shlex
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarctl import __version__, checkpoint, distributed, fsutil, rundir
from cifarctl.augment import NORMALIZATION, Preprocess, Rows, TrainBatches
from cifarctl.averaging import Lookahead
from cifarctl.budget import process_age_s
from cifarctl.config import DownloadConfig, TrainConfig, parse_widths
from cifarctl.data import Dataset, dataset_stats, ensure_dataset, stratified_split
from cifarctl.device import configure, preserved_torch_state, resolve_device, resolve_precision
from cifarctl.distributed import World
from cifarctl.errors import CifarctlError, Interrupted, UsageError
from cifarctl.metrics import evaluate, evaluate_plain_and_tta
from cifarctl.models import build_model, check_image_size
from cifarctl.progress import Reporter
from cifarctl.rundir import RunDir
from cifarctl.steppers import Stepper, make_stepper
from cifarctl.weights import save_weights

# Options a resumed run cannot change: they fix the model, the data order or the averaging.
FIXED_ON_RESUME = ("model", "batch_size", "seed", "width", "lookahead", "flip", "dataset", "val_split")


class TrainingInterrupted(Interrupted):
    """Ctrl-C or SIGTERM: the checkpoint is written and the message says how to resume."""


class NonFiniteLoss(CifarctlError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


@dataclass
class Run:
    """Everything one training run holds while it runs."""

    cfg: TrainConfig
    world: World
    device: torch.device
    out: RunDir
    ds: Dataset
    mean: list[float]
    std: list[float]
    prep: Preprocess  # uint8 batches -> normalised floats on the device
    train_y: torch.Tensor  # (N,) int64 on the device
    test_x: Any  # (M, H, W, 3) uint8: memory-mapped, or a copy on the device
    test_y: torch.Tensor
    val_x: Rows | None  # held-out training images (--val-split), uint8, read by row
    val_y: torch.Tensor | None
    model: torch.nn.Module
    model_config: dict[str, Any]
    stepper: Stepper
    batches: TrainBatches
    generators: dict[str, torch.Generator]
    lookahead: Lookahead | None
    steps_per_epoch: int
    global_batch: int
    epoch: int = 0  # 0-based epoch to run next
    step: int = 0  # steps of that epoch already done
    elapsed: float = 0.0  # seconds trained by earlier processes of this run
    perm: torch.Tensor | None = None  # the current epoch's shuffle order
    rows: list[dict[str, Any]] = field(default_factory=list)
    accuracy: float = float("nan")
    accuracy_plain: float = float("nan")
    tta_used: bool = False  # whether `accuracy` was measured with the recipe's TTA
    train_time: float = 0.0
    trained_images: int = 0
    # Validation (--val-split): the best epoch so far, epochs since it, and why the run stopped early.
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "val_accuracy": -1.0, "since": 0})
    val_accuracy: float | None = None
    val_loss: float | None = None
    stop_reason: str | None = None
    clock: Any = None  # budget.BudgetClock under --budget
    steps_cap: int | None = None  # the step count --budget planned, or shortened the run to
    planned_steps: int | None = None  # the step count --budget planned (its last epoch may be partial)
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: the planned ones, or fewer once --budget had to shorten it."""
        planned = self.steps_per_epoch * self.cfg.epochs
        return planned if self.steps_cap is None else min(planned, self.steps_cap)

    def seconds(self) -> float:
        """Training seconds of the whole run so far, earlier processes included."""
        return self.elapsed + time.perf_counter() - self.t_start


def train(cfg: TrainConfig, reporter: Reporter, resume: Path | None = None,
          overrides: dict[str, Any] | None = None, started: float | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns a JSON-able summary. Raises CifarctlError subclasses.

    `started` (a time.perf_counter() value) is when the user's clock started for --budget: the
    CLI passes its process start; by default, now. Under torchrun (WORLD_SIZE > 1) every process
    calls this; rank 0 alone reports and writes files. Torch's process-wide settings are as they
    were when it returns.
    """
    world = distributed.world_from_env()
    started = time.perf_counter() if started is None else started
    with preserved_torch_state():
        if not world.enabled:
            return _train(cfg, reporter, resume, overrides, world, started)
        try:
            return _train(cfg, reporter if world.is_main else Reporter(), resume, overrides, world, started)
        except (RuntimeError, torch.distributed.DistBackendError) as err:
            raise distributed.collective_error(err) from err
        finally:
            distributed.shutdown()


def _train(cfg: TrainConfig, reporter: Reporter, resume: Path | None, overrides: dict[str, Any] | None,
           world: World, started: float) -> dict[str, Any]:
    cfg, resume_dir = resolve_config(cfg, resume, overrides)
    _refuse_budget_across_processes(cfg, world.size)
    device = _join(cfg, world)
    out = _output_dir(cfg, resume_dir, world)
    if not world.is_main:
        return _train_in(cfg, out, resume_dir is not None, reporter, world, device, started)
    with rundir.locked(out):
        rundir.clean_stale(out)
        rundir.check_outputs(out)
        if resume_dir is None:
            rundir.refuse_existing(out, cfg.overwrite)
        return _train_in(cfg, out, resume_dir is not None, reporter, world, device, started)


def _train_in(cfg: TrainConfig, out: RunDir, resuming: bool, reporter: Reporter, world: World,
              device: torch.device, started: float) -> dict[str, Any]:
    state = checkpoint.load(out.checkpoint) if resuming else None
    run = setup(cfg, out, device, world, reporter, fresh=state is None, started=started)
    if state is not None:
        restore(run, *state)
        reporter.log(f"resuming {out.root} at epoch {run.epoch + 1}, step {run.step}")
    if cfg.plan is not None:
        _start_budget_clock(run, started)
    if world.is_main:
        _write_config(run)
    with _stop_signals() as caught:
        while run.epoch < cfg.epochs and run.stop_reason is None:
            run_epoch(run, reporter, caught)
            end_epoch(run, reporter)
    return finish(run, reporter)


def _start_budget_clock(run: Run, started: float) -> None:
    """Under --budget: the clock that keeps the run inside what is left of its budget, which is
    the whole budget less this process's start-up and, when resuming, the earlier processes' time
    (so call it after `restore`). A run that was lengthened past its plan goes on from where it
    stopped."""
    from cifarctl.budget import SAFETY, BudgetClock, planned_steps

    cfg = run.cfg
    spent = run.elapsed + time.perf_counter() - started
    run.clock = BudgetClock(cfg.budget - spent, cfg.plan["final_eval_s"], steps_per_epoch=run.steps_per_epoch,
                            margin_s=(1 - SAFETY) * cfg.budget)
    done = run.epoch * run.steps_per_epoch + run.step
    run.planned_steps = run.steps_cap = max(planned_steps(cfg.plan, run.steps_per_epoch), done + 1)
    if run.lookahead is not None:
        run.lookahead.total_steps = run.total_steps


def resolve_config(cfg: TrainConfig, resume: Path | None,
                   overrides: dict[str, Any] | None) -> tuple[TrainConfig, RunDir | None]:
    """The run's config, merged once: the preset `cfg` for a new run, or the resumed run's saved
    config with `overrides` applied (some options cannot change). Validated before any work."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    run = None
    if resume is not None:
        run = rundir.resolve_resume(resume)
        saved = TrainConfig.from_json(checkpoint.read_config(run.checkpoint))
        fixed = sorted(k for k, v in overrides.items() if k in FIXED_ON_RESUME and v != getattr(saved, k))
        if fixed:
            raise UsageError(f"--resume cannot change {', '.join(fixed)}; start a new run instead")
        for key, value in overrides.items():
            setattr(saved, key, value)
        cfg = saved
        cfg.output_dir = run.root
    elif cfg.seed is None:
        cfg.seed = secrets.randbelow(2**31)
    if cfg.budget is not None and run is None:
        from cifarctl.budget import planned_options

        for key, flag in planned_options(cfg.model).items():
            if overrides.get(key) is not None:
                raise UsageError(f"--budget plans the {key.replace('_', ' ')} itself; give --budget or {flag}, not both")
    cfg.validate()
    return cfg, run


def preflight(cfg: TrainConfig, resume: Path | None, overrides: dict[str, Any] | None, nproc: int = 1) -> int:
    """Check what a run would check before it starts, without starting it (for --nproc, whose
    processes should not each fail on the same bad option). Returns the run's seed."""
    cfg, resume_dir = resolve_config(cfg, resume, overrides)
    _refuse_budget_across_processes(cfg, nproc)
    resolve_device(cfg.device)
    if resume_dir is None and cfg.output_dir is not None:
        out = Path(cfg.output_dir)
        if os.path.lexists(out):
            rundir.refuse_existing(rundir.create(out), cfg.overwrite)
    return cfg.seed


def _refuse_budget_across_processes(cfg: TrainConfig, processes: int) -> None:
    """--budget plans and keeps time in one process: ranks timing the machine on their own could
    choose different widths or lengths and then wait on each other forever."""
    if cfg.budget is not None and processes > 1:
        raise UsageError(f"--budget plans for a single process; it does not work across {processes} processes "
                         "(--nproc or torchrun): drop --budget, or train in one process")


def _join(cfg: TrainConfig, world: World) -> torch.device:
    """Resolve the device, join the process group under torchrun, and apply the run's settings."""
    device = resolve_device(cfg.device)
    if world.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        distributed.init(world, device.type, cfg.dist_timeout)
    configure(device, cfg.deterministic, cfg.compile)
    cfg.precision = resolve_precision(cfg.precision, device)  # recorded resolved, so a resume keeps it
    return device


def _output_dir(cfg: TrainConfig, resume_dir: RunDir | None, world: World) -> RunDir:
    """The run directory: the resumed one, -o, or a fresh timestamped one (rank 0's name on every rank)."""
    if resume_dir is not None:
        return resume_dir
    root = Path(cfg.output_dir) if cfg.output_dir else rundir.default_output_dir(cfg.model)
    if world.enabled:
        root = Path(distributed.broadcast_text(str(root)))
    if not world.is_main:
        return RunDir(root)
    return rundir.create(root)  # whether it holds a run is checked once it is locked


def setup(cfg: TrainConfig, out: RunDir, device: torch.device, world: World, reporter: Reporter,
          fresh: bool, started: float | None = None) -> Run:
    """Data on the device, the model, its stepper and the run's generators, in the order that
    makes a seeded run repeatable."""
    _seed_everything(cfg.seed)
    ds = ensure_dataset(DownloadConfig(data_dir=cfg.data_dir, dataset=cfg.dataset), reporter)
    mean, std = NORMALIZATION["tutorial"] if cfg.normalization == "tutorial" else dataset_stats(ds)
    # bf16 runs normalise into bf16: the batches the model sees are bf16 under autocast anyway.
    prep = Preprocess(mean, std, device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    check_image_size(cfg.model, ds.train.images.shape[1])
    images, test_x = place_images(ds, device, reporter)
    labels, kept = ds.train.labels, None
    val_x = val_y = None
    if cfg.val_split:
        # Seeded by the run's seed, so a resumed run holds out the same images.
        kept, held = (torch.as_tensor(i) for i in stratified_split(labels.numpy(), cfg.val_split, cfg.seed))
        val_x, val_y = Rows(images, held), labels[held].to(device)
        labels = labels[kept]
    generators = {"shuffle": torch.Generator().manual_seed(cfg.seed),
                  "augment": torch.Generator(device=device).manual_seed(cfg.seed + 1)}
    batches = TrainBatches(images, prep, generators["augment"], rows=kept, crop_pad=cfg.crop_pad, flip=cfg.flip,
                           cutout=cfg.cutout, channels_last=cfg.channels_last,  # flip_base: the same on every rank
                           release=ds.release_pages if images.device.type == "cpu" else None)
    if cfg.budget is not None and cfg.plan is None:
        from cifarctl.budget import CALIBRATION_BATCH, plan_run

        sample = batches.gather(torch.arange(min(len(labels), CALIBRATION_BATCH)))
        plan_run(cfg, sample, len(labels), len(test_x), len(ds.class_names), device, reporter,
                 time.perf_counter() - (started or time.perf_counter()))  # sets epochs and width
    mconfig = {"num_classes": len(ds.class_names)}
    if cfg.width:
        mconfig["widths"] = parse_widths(cfg.width, cfg.model)
    model = build_model(cfg.model, mconfig).to(device)
    if hasattr(model, "init_whitening") and fresh:
        # A few thousand images pin down a 12x12 patch covariance; the seeded perm makes it repeatable.
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.seed))[:5000]
        model.init_whitening(batches.gather(pick))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stepper = make_stepper(model, cfg, device, world)
    if world.rank:
        generators["augment"].manual_seed(cfg.seed + 1 + 1_000_003 * world.rank)  # other crops and flips per rank
    global_batch = cfg.batch_size * world.size  # each rank takes batch_size images of every global batch
    steps_per_epoch = math.ceil(len(labels) / global_batch)
    lookahead = Lookahead(model, steps_per_epoch * cfg.epochs) if cfg.lookahead else None
    ds.release_pages()  # the whitening (and a budget's calibration) read through the map too
    return Run(cfg, world, device, out, ds, mean, std, prep, labels.to(device), test_x, ds.test.labels.to(device),
               val_x, val_y, model, mconfig, stepper, batches, generators, lookahead, steps_per_epoch, global_batch)


def place_images(ds: Dataset, device: torch.device, reporter: Reporter) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 images where batches are read from: the memory-mapped cache (on the
    CPU, and for a GPU whose free memory they would crowd), or a uint8 copy in GPU memory."""
    train, test = ds.train.images, ds.test.images
    if device.type == "cuda":
        nbytes = train.nbytes + test.nbytes
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= free // 4:  # the rest is for the model, its activations and the allocator's slack
            reporter.log(f"dataset: a uint8 copy on {device} ({nbytes / 1e6:,.0f} MB)")
            copies = train.to(device), test.to(device)
            ds.release_pages()
            return copies
        reporter.log(f"dataset: {nbytes / 1e6:,.0f} MB stays memory-mapped in host memory; batches are copied to "
                     f"{device} as they are needed")
    return train, test


def restore(run: Run, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Continue from a checkpoint: model, optimizer, averaging, augmentation and RNG states, position."""
    checkpoint.check_compatible(meta, tensors, run.out.checkpoint, model=run.cfg.model,
                                class_names=run.ds.class_names, state=run.model.state_dict(),
                                dataset={"train_count": len(run.train_y)})
    state = checkpoint.unpack(tensors)
    run.model.load_state_dict(state["model"])
    run.stepper.load_momentum_buffers(state["momentum"])
    checkpoint.set_rng_state(tensors, meta["rng"], run.generators, run.out.checkpoint)
    if run.lookahead is not None:
        run.lookahead.load_state_dict(state["lookahead"])
    if run.batches.flip_base is not None:
        run.batches.flip_base.copy_(tensors["flip_base"])
    run.epoch, run.step, run.elapsed = meta["epoch"], meta["step"], meta["elapsed_s"]
    run.best = {**run.best, **(meta.get("validation") or {})}
    run.stop_reason = run.best.pop("stop_reason", None)
    run.perm = tensors["perm"].to(run.device) if run.step else None
    done = run.epoch * run.steps_per_epoch + run.step
    run.rows = [r for r in rundir.read_metrics(run.out.metrics) if int(r["step"]) <= done]
    tested = [r for r in run.rows if r["kind"] == "epoch" and r.get("test_acc")]
    if tested:
        run.accuracy = float(tested[-1]["test_acc"])
        run.accuracy_plain = float(tested[-1].get("test_acc_plain") or run.accuracy)
    validated = [r for r in run.rows if r["kind"] == "epoch" and r.get("val_acc")]
    if validated:
        run.val_accuracy, run.val_loss = float(validated[-1]["val_acc"]), float(validated[-1]["val_loss"])


def save_checkpoint(run: Run) -> None:
    """The resumable state at the current position, written atomically."""
    rng_tensors, rng_values = checkpoint.rng_state(run.generators)
    tensors = checkpoint.pack(model=run.model.state_dict(), momentum=run.stepper.momentum_buffers(),
                              lookahead=run.lookahead.state_dict() if run.lookahead is not None else {})
    tensors.update(rng_tensors)
    if run.perm is not None and run.step:
        tensors["perm"] = run.perm
    if run.batches.flip_base is not None:
        tensors["flip_base"] = run.batches.flip_base
    meta = {"epoch": run.epoch, "step": run.step, "elapsed_s": run.seconds(), "config": run.cfg.to_json(),
            "rng": rng_values, "class_names": run.ds.class_names, "dataset": {"train_count": len(run.train_y)},
            "validation": {**run.best, "stop_reason": run.stop_reason}}
    checkpoint.save(run.out.checkpoint, tensors, meta)


def run_epoch(run: Run, reporter: Reporter, caught: list[int]) -> None:
    """Train from the run's position to the end of the current epoch; on a stop signal save a
    checkpoint and raise TrainingInterrupted."""
    cfg, world = run.cfg, run.world
    if run.perm is None:
        run.perm = torch.randperm(len(run.train_y), generator=run.generators["shuffle"]).to(run.device)
    # Each rank reads only its own part of every global batch from the images.
    run.batches.start_epoch([distributed.shard(idx, world) if world.enabled else idx
                             for idx in run.perm.split(run.global_batch)])
    log_every = cfg.log_every
    ui_every = max(1, min(log_every, 200))  # progress updates: cheap, but not free at batch 4
    running = torch.zeros((), device=run.device)
    since_log, first = 0, run.step
    t_epoch = time.perf_counter()
    if run.clock is not None:
        run.clock.epoch_started(run.epoch * run.steps_per_epoch + first)
    with reporter.task(f"epoch {run.epoch + 1}/{cfg.epochs}", run.steps_per_epoch) as task:
        task.update(first)
        for i in range(first, run.steps_per_epoch):
            global_step = run.epoch * run.steps_per_epoch + i
            if run.clock is not None and not _within_budget(run, global_step):
                break
            if cfg.schedule != "constant":
                run.stepper.set_lr(lr_at(cfg, global_step, run.total_steps, run.steps_per_epoch))
            x, idx = run.batches(i, run.epoch)
            loss = run.stepper(x, run.train_y[idx])
            if run.lookahead is not None:
                run.lookahead.after_step(global_step + 1)
            running += loss
            since_log += 1
            run.step = i + 1
            if run.device.type == "cpu" and not math.isfinite(loss.item()):
                _fail_non_finite(run, i)
            # Ranks must agree on the step they stop at, or one would wait forever in all-reduce.
            if distributed.any_rank(bool(caught), run.device) if world.enabled else caught:
                if world.is_main:
                    save_checkpoint(run)
                raise _interrupted(caught[0] if caught else signal.SIGTERM, run.out.root)
            if run.step % ui_every == 0 or run.step == run.steps_per_epoch:
                rate = (run.step - first) * run.global_batch / max(time.perf_counter() - t_epoch, 1e-9)
                task.update(run.step, imgs_s=f"{rate:,.0f} img/s")
            if run.step % log_every == 0:
                _log_loss(run, reporter, task, float(running) / since_log)  # the one host sync per interval
                running.zero_()
                since_log = 0
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    if run.clock is not None:
        run.clock.epoch_ended()
    if since_log and not math.isfinite(float(running)):
        _fail_non_finite(run, run.steps_per_epoch - 1)
    epoch_time = time.perf_counter() - t_epoch
    n = len(run.train_y)
    images = min(run.step * run.global_batch, n) - min(first * run.global_batch, n)
    if run.steps_cap is not None and run.epoch * run.steps_per_epoch + run.step >= run.total_steps \
            and run.total_steps < (run.planned_steps or run.steps_per_epoch * cfg.epochs):
        run.stop_reason = f"--budget: shortened to {run.total_steps} steps to end in time"
    run.train_time += epoch_time
    run.trained_images += images
    run.rows.append({"kind": "epoch", "epoch": run.epoch + 1, "train_s": f"{epoch_time:.2f}",
                     "images_per_s": f"{images / epoch_time:.1f}"})


def _within_budget(run: Run, global_step: int) -> bool:
    """Under --budget: shorten the run when the clock says the planned end would be late, or
    lengthen it when it runs ahead, by whole epochs if need be (a calibration that caught the
    machine in a slow moment must not leave the budget unused); the schedule and the weight
    averaging follow the new length. False once it is over."""
    from cifarctl.budget import MAX_EPOCHS

    spe = run.steps_per_epoch
    cap = run.clock.total_steps(global_step, run.planned_steps, spe * MAX_EPOCHS)
    if cap != run.steps_cap:
        run.steps_cap = cap
        # Never below the plan's epochs: a shortened run ends through its stop reason instead.
        run.cfg.epochs = max(run.cfg.plan["epochs"], math.ceil(cap / spe))
        if run.lookahead is not None:
            run.lookahead.total_steps = cap
    return global_step < run.total_steps


def _log_loss(run: Run, reporter: Reporter, task: Any, value: float) -> None:
    """The tutorial's running-loss line, and a metrics row."""
    if not math.isfinite(value):
        _fail_non_finite(run, run.step - 1)
    global_step = run.epoch * run.steps_per_epoch + run.step
    task.update(loss=f"loss {value:.3f}")
    reporter.log(f"[{run.epoch + 1}, {run.step:5d}] loss: {value:.3f}")
    run.rows.append({"kind": "log", "epoch": run.epoch + 1, "step": global_step,
                     "images": min(global_step * run.global_batch, (run.epoch + 1) * len(run.train_y)),
                     "train_loss": f"{value:.5f}", "lr": f"{run.stepper.lr():.6g}",
                     "elapsed_s": f"{run.seconds():.2f}"})


def end_epoch(run: Run, reporter: Reporter) -> None:
    """Score the epoch (validation set if there is one, else the test set), log, and save weights,
    checkpoint and metrics (rank 0); the other ranks wait for the verdict. Moves the run to the
    start of the next epoch, or stops it early (--patience)."""
    run.epoch, run.step, run.perm = run.epoch + 1, 0, None
    if not run.world.is_main:
        run.rows.pop()
        run.stop_reason = distributed.broadcast_text(None) or None  # rank 0 evaluates and decides
        return
    row = run.rows[-1]
    if run.val_x is not None:
        _validate(run, reporter, row)
    last = run.epoch == run.cfg.epochs or run.stop_reason is not None
    every = run.cfg.eval_every
    # With a validation split the test set is scored once, at the end; else every --eval-every epochs.
    if last or (run.val_x is None and every and run.epoch % every == 0):
        _score_test(run, reporter, row, tta=last and run.cfg.tta != "none")
    else:
        run.accuracy = run.accuracy_plain = float("nan")  # nothing stale goes into this epoch's weights
        reporter.log(f"epoch {run.epoch}: done in {row['train_s']} s")
    run.ds.release_pages()  # scoring read its images through the cache's map
    row.update({"step": run.epoch * run.steps_per_epoch, "images": run.epoch * len(run.train_y),
                "elapsed_s": f"{run.seconds():.2f}"})
    save_weights(run.out.weights, run.model.state_dict(), _weights_meta(run))
    save_checkpoint(run)
    rundir.write_metrics(run.out.metrics, run.rows)
    rundir.point_latest(run.out, reporter.log)  # only once the run has weights
    if run.world.enabled:
        distributed.broadcast_text(run.stop_reason or "")


def _score_test(run: Run, reporter: Reporter, row: dict[str, Any], tta: bool) -> None:
    """Test accuracy (TTA costs a forward pass per view: on the final epoch only; the plain
    accuracy then comes from the same pass)."""
    cfg, classes = run.cfg, len(run.ds.class_names)
    bf16 = cfg.precision == "bf16"
    if tta:
        ev_plain, ev = evaluate_plain_and_tta(run.model, run.test_x, run.test_y, classes, cfg.tta, bf16, run.prep)
    else:
        ev_plain = ev = evaluate(run.model, run.test_x, run.test_y, classes, bf16=bf16, prep=run.prep)
    run.accuracy, run.accuracy_plain, run.tta_used = ev.accuracy, ev_plain.accuracy, tta
    row.update({"test_loss": f"{ev.loss:.5f}", "test_acc": f"{ev.accuracy:.5f}",
                "test_acc_plain": f"{ev_plain.accuracy:.5f}"})
    tta_note = f", {100 * ev.accuracy:.2f}% with {cfg.tta} TTA" if tta else ""
    reporter.log(f"epoch {run.epoch}: test accuracy {100 * ev_plain.accuracy:.2f}%{tta_note}  "
                 f"(loss {ev.loss:.3f}, {row['train_s']} s)")


def _validate(run: Run, reporter: Reporter, row: dict[str, Any]) -> None:
    """Validation accuracy; keep the best epoch's weights in best.safetensors; stop after
    --patience epochs without improvement."""
    cfg = run.cfg
    ev = evaluate(run.model, run.val_x, run.val_y, len(run.ds.class_names), bf16=cfg.precision == "bf16",
                  prep=run.prep)
    run.val_accuracy, run.val_loss = ev.accuracy, ev.loss
    row.update({"val_loss": f"{ev.loss:.5f}", "val_acc": f"{ev.accuracy:.5f}"})
    improved = ev.accuracy > run.best["val_accuracy"]
    if improved:
        run.best = {"epoch": run.epoch, "val_accuracy": ev.accuracy, "since": 0}
        save_weights(run.out.best, run.model.state_dict(), _weights_meta(run))
    else:
        run.best["since"] += 1
    note = "  best so far" if improved else f"  (best: epoch {run.best['epoch']})"
    reporter.log(f"epoch {run.epoch}: validation accuracy {100 * ev.accuracy:.2f}% (loss {ev.loss:.3f}, "
                 f"{row['train_s']} s){note}")
    if cfg.patience is not None and run.best["since"] >= cfg.patience and run.epoch < cfg.epochs:
        run.stop_reason = f"no better validation accuracy for {cfg.patience} epochs"
        reporter.log(f"stopping early after epoch {run.epoch}: {run.stop_reason}; best.safetensors holds "
                     f"epoch {run.best['epoch']}")


def _weights_meta(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    meta = {"model": cfg.model, "model_config": run.model_config, "class_names": run.ds.class_names,
            "dataset": cfg.dataset, "image_size": str(run.ds.train.images.shape[1]), "mean": run.mean,
            "std": run.std, "epochs": str(run.epoch),
            "tta": cfg.tta if run.tta_used else "none", "precision": cfg.precision, "seed": str(cfg.seed),
            "cifarctl_version": __version__, "torch_version": torch.__version__, "train_config": cfg.to_json(),
            "elapsed_s": f"{run.seconds():.1f}"}
    if cfg.plan is not None:
        meta.update(budget_s=f"{cfg.budget:g}", budget_plan=cfg.plan)
    if not math.isnan(run.accuracy):
        meta.update(test_accuracy=f"{run.accuracy:.6f}", test_accuracy_plain=f"{run.accuracy_plain:.6f}")
    if run.val_accuracy is not None:
        meta.update(val_split=str(cfg.val_split), val_accuracy=f"{run.val_accuracy:.6f}",
                    best_epoch=str(run.best["epoch"]), stop_reason=run.stop_reason or "")
    return meta


def _write_config(run: Run, result: dict[str, Any] | None = None) -> None:
    """config.json: the full config, where it ran, and (once finished) how the run ended."""
    fsutil.write_text(run.out.config, json.dumps(
        {**run.cfg.to_json(), "device_resolved": str(run.device), "world_size": run.world.size,
         "cifarctl_version": __version__, "torch_version": torch.__version__,
         **({"result": result} if result else {})}, indent=2) + "\n")


def finish(run: Run, reporter: Reporter) -> dict[str, Any]:
    """Draw the curves and return the run's summary."""
    from cifarctl.plots import plot_curves

    summary = _summary(run)
    if run.world.is_main:
        plot_curves(run.rows, run.out.curves, f"{run.cfg.model}: {100 * run.accuracy:.2f}% test accuracy")
        rundir.point_latest(run.out, reporter.log)
        _write_config(run, {k: summary[k] for k in ("test_accuracy", "val_split", "val_accuracy", "best_epoch",
                                                    "stop_reason", "epochs_run", "time_s", "train_time_s",
                                                    "process_s")})
    return summary


def _summary(run: Run) -> dict[str, Any]:
    return {
        "run_dir": str(run.out.root),
        "weights": str(run.out.weights),
        "model": run.cfg.model,
        "epochs": run.cfg.epochs,
        "test_accuracy": run.accuracy,
        "test_accuracy_plain": run.accuracy_plain,
        "tta": run.cfg.tta,
        "dataset": run.cfg.dataset,
        "val_split": run.cfg.val_split,
        "val_accuracy": run.val_accuracy,
        "val_loss": run.val_loss,
        "best_epoch": run.best["epoch"] if run.val_x is not None else None,
        "stop_reason": run.stop_reason or "epochs",
        "budget_s": run.cfg.budget,
        "plan": run.cfg.plan,
        "epochs_run": run.epoch,
        "time_s": round(run.seconds(), 2),
        "process_s": round(process_age_s(), 2),  # the whole process so far, start-up included (Linux)
        "train_time_s": round(run.train_time, 2),
        "images_per_s": round(run.trained_images / run.train_time, 1) if run.train_time else None,
        "device": str(run.device),
        "world_size": run.world.size,
        "compiled_graphs": getattr(run.stepper, "compiled_graphs", lambda: 0)(),
        "seed": run.cfg.seed,
        "files": run.out.files(),
    }


def lr_at(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate for 0-based global `step`: constant, or onecycle (linear warm-up, linear decay to 0)."""
    if cfg.schedule == "constant":
        return cfg.lr
    warm = max(int(cfg.warmup_epochs * steps_per_epoch), 1)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(total_steps - step, 0) / max(total_steps - warm, 1)


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fail_non_finite(run: Run, i: int) -> None:
    kept = "the weights and checkpoint from the last finished epoch are kept" if run.out.weights.exists() \
        else "no weights were saved"
    raise NonFiniteLoss(f"loss became NaN or infinite at epoch {run.epoch + 1}, step {i + 1}; {kept}. "
                        "Lower --lr and start again (or --resume with a lower --lr)")


def _interrupted(signum: int, run_dir: Path) -> TrainingInterrupted:
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    return TrainingInterrupted(f"{name}: stopped and saved a checkpoint; resume with: "
                               f"cifarctl train --resume {shlex.quote(str(run_dir))}", exit_code=128 + signum)
