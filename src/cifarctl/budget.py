"""`train --budget SECONDS`: fit the recipe to the time a user has, instead of cutting it off.

Before training, a few calibration steps are timed on this machine for each width the model
offers; the planner picks the widest network that still gets enough epochs, and as many epochs
as fit, so that start-up, training and the final evaluation end inside the budget. The
learning-rate schedule and the weight averaging are set for that length. While training, a
controller watches the clock: if the machine slows down, it shortens the run (the last epoch
ends early and the schedule is compressed to match), so the run ends close to the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cifarctl.errors import UsageError


@dataclass(frozen=True)
class Rung:
    """One step of a model's ladder: a width, the fewest epochs it needs to pay off (below that a
    narrower network trained longer did better), and the batch size and learning rate it trains
    at where they differ from the preset's."""

    width: str | None
    min_epochs: int
    batch_size: int | None = None
    lr: float | None = None


# Width ladders, widest first (the recipe experiments of docs/models.md). On a CPU the first
# group's width costs the most (it runs at 31x31), so the cheap rungs widen the later groups
# first: 16,64,128 for 5 epochs beat 16,32,64 for 8 by 1.7 points in less time. The narrowest rung
# trains about 2 epochs, where twice the steps at half the batch (lr scaled by 1/sqrt(2)) scored
# about a point higher and ran faster per image; at 5 epochs of 16,64,128 it paid nothing.
LADDERS: dict[str, list[Rung]] = {
    "fast": [Rung("32,128,256", 14), Rung("32,96,192", 8), Rung("24,64,128", 7), Rung("16,64,128", 4),
             Rung("16,32,64", 1, batch_size=128, lr=0.25)],
    "resnet18": [Rung(None, 1)],
}


def planned_options(model: str) -> dict[str, str]:
    """{config field: its option} for what --budget chooses for `model`: giving one too is refused."""
    rungs = LADDERS.get(model, [])
    planned = {"epochs": "--epochs", "width": "--width"}
    if any(r.batch_size for r in rungs):
        planned["batch_size"] = "--batch-size"
    if any(r.lr for r in rungs):
        planned["lr"] = "--lr"
    return planned


MAX_EPOCHS = 100
SAFETY = 0.9  # plan for this share of the budget: timing noise must not push the run over
# The six-view flip-translate TTA is lowered to flip (two views) when its pass would take more than
# this share of the budget: at 60 s its extra 7 s bought about 0.2 points where the same seconds of
# training buy more (docs/models.md).
TTA_SHARE = 0.1
CHECK_EVERY_S = 1.0  # how often the controller looks at the clock
CALIBRATION_BATCH = 256  # images per timed calibration step (smaller batches time too fast per image)
CALIBRATION_S = 0.5  # seconds of timed training steps per rung, after two warm-up steps
PIPELINE = 1.05  # reading and augmenting each batch: about 5% of a step (the profile in docs/models.md)
WARMUP_STEPS = 10  # steps the controller lets pass before it judges the speed
FREEZE = 0.9  # share of the (shortened) run after which its length no longer changes


@dataclass
class Plan:
    """What `--budget` chose, and what it expects; recorded in config.json and the weights."""

    budget_s: float
    width: str | None
    epochs: int  # epochs begun: train_epochs rounded up
    epoch_s: float  # estimated seconds per epoch at this width
    final_eval_s: float  # estimated seconds of the final (TTA) evaluation and file writing
    start_s: float  # seconds already spent when the plan was made (start-up, calibration)
    expected_s: float  # start_s + train_epochs * epoch_s + final_eval_s
    # The epochs that fit, to 1/100: the last one is cut there, with the schedule set for that
    # length, so no budget loses up to an epoch to rounding down (at 60 s, 1.8 epochs fit).
    train_epochs: float = 0.0
    batch_size: int | None = None  # the rung's batch size and learning rate (None: the preset's)
    lr: float | None = None
    tta: str | None = None  # the test-time augmentation the final score uses (None: the preset's)

    def to_json(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def planned_steps(plan: dict, steps_per_epoch: int) -> int:
    """The optimizer steps a recorded plan trains for (plans from before fractional epochs: whole ones)."""
    epochs = plan.get("train_epochs") or plan["epochs"]
    return max(1, min(plan["epochs"] * steps_per_epoch, math.floor(epochs * steps_per_epoch)))


def make_plan(model: str, budget_s: float, start_s: float, epoch_s: dict[str | None, float],
              final_eval_s: dict[str | None, float], tta: dict[str | None, str] | None = None) -> Plan:
    """The widest rung of `model`'s ladder whose minimum epochs fit the budget, with as many
    epochs as fit. `epoch_s` and `final_eval_s` hold the calibrated seconds per rung (by width),
    `tta` the test-time augmentation each would score with."""
    if model not in LADDERS:
        raise UsageError(f"--budget works with --model fast or resnet18, not {model}")
    usable = budget_s * SAFETY - start_s
    best = None
    for rung in LADDERS[model]:
        width = rung.width
        if width not in epoch_s:
            continue
        fit = min(MAX_EPOCHS, math.floor(100 * (usable - final_eval_s[width]) / epoch_s[width]) / 100)
        plan = Plan(budget_s, width, math.ceil(fit), epoch_s[width], final_eval_s[width], start_s,
                    start_s + fit * epoch_s[width] + final_eval_s[width], fit, rung.batch_size, rung.lr,
                    (tta or {}).get(width))
        if fit >= rung.min_epochs:
            return plan
        if best is None or fit > best.train_epochs:
            best = plan
    if best is None or best.train_epochs < 1:
        need = start_s + min(epoch_s[w] + final_eval_s[w] for w in epoch_s)
        raise UsageError(f"--budget {budget_s:g} s is too small for even one epoch on this machine (about "
                         f"{need / SAFETY:.0f} s needed, {start_s:.0f} s of them already spent starting and "
                         "timing); give a larger budget")
    return best


class BudgetClock:
    """Keeps a run inside its deadline: `total_steps(done, planned, ceiling)` says how many steps
    the run should take, given the time per step seen so far and the final evaluation still to come.

    It shortens a run that falls behind (never past the deadline), and lengthens one that runs
    ahead of its plan, up to `ceiling` (the end of the last epoch begun) and only into the time the
    plan meant to spend (`margin_s` before the deadline is kept free), since calibration timed a
    few steps and the run times thousands. `clock` is injectable so tests can slow time down mid-run.
    """

    def __init__(self, deadline_s: float, final_eval_s: float, clock: Callable[[], float] = time.perf_counter,
                 started: float | None = None, steps_per_epoch: int = 0, margin_s: float = 0.0) -> None:
        self.clock = clock
        self.steps_per_epoch = steps_per_epoch
        self.epoch_end_s = 0.0  # seconds each epoch's end takes (scoring, saving), measured
        self.last_end: float | None = None
        self.start = clock() if started is None else started
        self.deadline = deadline_s  # seconds after `start` by which the whole run must end
        self.margin = margin_s  # seconds before the deadline a lengthened run leaves free
        self.final_eval_s = final_eval_s
        self.mark = (self.start, 0)  # (time, steps done) of the last look, for the recent step time
        self.step_s: float | None = None
        self.cap: int | None = None

    def elapsed(self) -> float:
        return self.clock() - self.start

    def epoch_ended(self) -> None:
        """Call when an epoch's steps are done, before it is scored and saved."""
        self.last_end = self.clock()

    def epoch_started(self, done: int) -> None:
        """Call when the next epoch's steps begin: the time since `epoch_ended` is the cost of an
        epoch's end, kept apart from the time per step."""
        now = self.clock()
        if self.last_end is not None:
            spent = now - self.last_end
            self.epoch_end_s = spent if not self.epoch_end_s else 0.5 * (self.epoch_end_s + spent)
        self.mark = (now, done)

    def total_steps(self, done: int, total: int, ceiling: int | None = None) -> int:
        """The run's total step count: `total` (the plan) while it fits, fewer (never below
        done + 1) once the recent time per step says the planned end would pass the deadline, more
        (up to `ceiling`) when the run is ahead of its plan.

        The first steps are not judged (they pay for one-off kernel selection and would make the
        machine look slower than it is); after that the time per step is a moving average over
        windows of at least CHECK_EVERY_S, so one slow second does not cut the run short.
        """
        ceiling = max(total, ceiling or total)
        now = self.clock()
        then, steps_then = self.mark
        if done > steps_then and now - then >= CHECK_EVERY_S:
            recent = (now - then) / (done - steps_then)
            self.step_s = recent if self.step_s is None else 0.6 * self.step_s + 0.4 * recent
            self.mark = (now, done)
        if self.step_s is None or done < max(WARMUP_STEPS, total // 20):
            return total
        if self.cap is not None and done >= FREEZE * self.cap:
            return min(ceiling, self.cap)  # near the end the length stays put: no last-minute schedule jumps
        # The length the run is heading for (its epoch ends are still to come), within the ceiling: an
        # unbounded guess would count epoch ends that cannot happen and cut the run short.
        length = min(ceiling, max(total, self.cap or 0))
        epochs_left = math.ceil((length - done) / self.steps_per_epoch) if self.steps_per_epoch else 0
        left = self.deadline - (now - self.start) - self.final_eval_s - epochs_left * self.epoch_end_s
        # Recomputed at every look: a slow spell that passes gives the steps back.
        cap = done + max(int(left / self.step_s), 1)
        if cap > total:  # ahead of the plan: lengthen, but keep the margin the plan kept
            cap = max(total, done + int((left - self.margin) / self.step_s))
        self.cap = cap
        return min(ceiling, cap)


def process_age_s() -> float:
    """Seconds since this process started (Linux: from /proc), so a budget counts start-up too;
    0 where that cannot be read."""
    try:
        import os

        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


WRITE_S = 3.0  # weights, checkpoint, metrics, curves.png and interpreter exit: about 2-3 s here


def plan_run(cfg, sample, n_train: int, n_test: int, classes: int, device, reporter, spent_s: float) -> Plan:
    """Time a few steps of the rungs of the model's ladder on this machine, make the plan, and
    set cfg.width, cfg.epochs (and the rung's batch size, learning rate and TTA) and cfg.plan from
    it (the global RNG is left untouched). `sample`: up to CALIBRATION_BATCH normalised training
    images on the device; `spent_s`: seconds of the budget already used (start-up) before this
    was called."""
    import torch

    t0 = time.perf_counter()
    epoch_s, final_s, tta = {}, {}, {}
    with torch.random.fork_rng(devices=[]):
        # Narrowest first: a rung costs more and needs more epochs than the one below it, so the
        # first rung that does not fit ends the timing, and a small budget spends little of
        # itself timing networks it cannot afford.
        for rung in reversed(LADDERS[cfg.model]):
            batch = rung.batch_size or cfg.batch_size
            step_s, image_s = _calibrate(cfg, rung.width, batch, sample, classes, device)
            epoch_s[rung.width] = math.ceil(n_train / batch) * step_s
            tta[rung.width] = final_tta(cfg.tta, n_test * image_s, cfg.budget)
            # One pass over the views scores both the plain and the TTA accuracy.
            final_s[rung.width] = n_test * image_s * VIEWS[tta[rung.width]] + WRITE_S
            spare = cfg.budget * SAFETY - spent_s - (time.perf_counter() - t0) - final_s[rung.width]
            if spare < rung.min_epochs * epoch_s[rung.width]:
                break
    plan = make_plan(cfg.model, cfg.budget, spent_s + time.perf_counter() - t0, epoch_s, final_s, tta)
    cfg.width, cfg.epochs, cfg.tta = plan.width, plan.epochs, plan.tta
    cfg.batch_size, cfg.lr = plan.batch_size or cfg.batch_size, plan.lr or cfg.lr
    cfg.eval_every = 0  # the per-epoch test pass is time the plan spends on training instead
    cfg.warmup_epochs = min(cfg.warmup_epochs, max(plan.train_epochs / 4, 0.25))
    cfg.plan = plan.to_json()
    reporter.log(f"budget {cfg.budget:g} s: {plan.train_epochs:g} epochs"
                 + (f" at width {plan.width}" if plan.width else "")
                 + f", batch {cfg.batch_size}, lr {cfg.lr:g}, {cfg.tta} TTA, about {plan.epoch_s:.1f} s an epoch; "
                 f"expected to end after {plan.expected_s:.0f} s")
    return plan


VIEWS = {"none": 1, "flip": 2, "flip-translate": 6}


def final_tta(asked: str, pass_s: float, budget_s: float) -> str:
    """The TTA a budgeted run scores with: `asked`, lowered from flip-translate to flip when its
    six views (`pass_s` seconds each) would take more than TTA_SHARE of the budget."""
    if asked == "flip-translate" and VIEWS[asked] * pass_s > TTA_SHARE * budget_s:
        return "flip"
    return asked


def _calibrate(cfg, width: str | None, batch_size: int, sample, classes: int, device) -> tuple[float, float]:
    """(seconds per training step of `batch_size` images, seconds per evaluated image) of `width`
    on this machine."""
    import torch

    from cifarctl.config import parse_widths
    from cifarctl.device import autocast
    from cifarctl.distributed import World
    from cifarctl.metrics import eval_batch
    from cifarctl.models import build_model
    from cifarctl.steppers import AutogradStepper

    mconfig = {"num_classes": classes, **({"widths": parse_widths(width)} if width else {})}
    model = build_model(cfg.model, mconfig).to(device)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    stepper = AutogradStepper(model, cfg, device, World())
    # A small batch keeps calibration cheap; a step's time grows in proportion to its images for
    # these conv nets on the CPU, so it is scaled up to the real batch size.
    n = min(batch_size, CALIBRATION_BATCH, len(sample))
    x = sample[:n].contiguous(memory_format=layout)
    y = torch.zeros(n, dtype=torch.long, device=device)
    step_s = _fastest_time(lambda: float(stepper(x, y)))  # float(): waits for the device
    model.eval()
    xe = x[:eval_batch(device)]  # timed at the batch size the final scoring uses
    with torch.no_grad(), autocast(device, cfg.precision == "bf16"):
        image_s = _fastest_time(lambda: float(model(xe)[0, 0]), CALIBRATION_S / 2) / len(xe)
    return step_s * batch_size / n * PIPELINE, image_s


def _fastest_time(call: Callable[[], object], at_least_s: float | None = None) -> float:
    """The fewest seconds `call` took, timed after two warm-up calls (kernel selection, caches)
    for at least `at_least_s` (default CALIBRATION_S) and 3 calls. The fastest, because a busy
    moment only ever slows a call: one slow evaluation pass once planned a 60 s run 6 s short. An
    optimistic plan costs little, since the clock shortens a run that falls behind; time that a
    pessimistic one leaves unused is lost."""
    at_least_s = CALIBRATION_S if at_least_s is None else at_least_s
    call()
    call()
    best, calls = math.inf, 0
    start = time.perf_counter()
    while calls < 3 or time.perf_counter() - start < at_least_s:
        t = time.perf_counter()
        call()
        best, calls = min(best, time.perf_counter() - t), calls + 1
    return best
