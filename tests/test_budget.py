"""`train --budget SECONDS`: the planner fits epochs and width to the time, a slowing machine
still ends close to the budget, and the rules around it (not with --epochs, too small, resume)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifarctl import budget
from cifarctl.budget import BudgetClock, make_plan
from cifarctl.cli import app
from cifarctl.config import train_config
from cifarctl.errors import UsageError
from cifarctl.progress import Reporter
from cifarctl.train import train

WIDEST, DEFAULT, SMALL, CHEAP, TINY = (r.width for r in budget.LADDERS["fast"])
EPOCH_S = {WIDEST: 30.0, DEFAULT: 16.0, SMALL: 8.0, CHEAP: 5.0, TINY: 3.0}
FINAL_S = {w: 8.0 for w in EPOCH_S}


def test_larger_budgets_get_more_epochs_and_wider_networks() -> None:
    """More time never plans fewer epochs at the same width, and buys a wider network once it pays."""
    plans = {b: make_plan("fast", b, 5.0, EPOCH_S, FINAL_S) for b in (30, 60, 180, 300, 600)}
    assert [plans[b].width for b in (30, 60, 180, 600)] == [TINY, CHEAP, DEFAULT, WIDEST]
    for b, plan in plans.items():
        assert plan.expected_s <= b * budget.SAFETY + 1e-9 and plan.epochs >= 1
    assert plans[180].epochs < plans[300].epochs


@pytest.mark.parametrize(("budget_s", "timed", "width"), [
    (40, [TINY, CHEAP], TINY), (120, [TINY, CHEAP, SMALL], CHEAP), (2000, [TINY, CHEAP, SMALL, DEFAULT, WIDEST], WIDEST)])
def test_calibration_times_the_narrowest_rungs_first_and_stops_at_the_first_that_does_not_fit(
        monkeypatch, budget_s: float, timed: list[str], width: str) -> None:
    """A small budget spends no time timing networks it cannot afford; the plan takes the widest rung that fits."""
    seen = []
    steps = {TINY: 0.01, CHEAP: 0.02, SMALL: 0.04, DEFAULT: 0.08, WIDEST: 0.16}  # seconds per step of 100 images

    def calibrate(cfg, width, *args):
        seen.append(width)
        return steps[width], 1e-5

    monkeypatch.setattr(budget, "_calibrate", calibrate)
    cfg = train_config("fast", budget=budget_s, batch_size=100)
    plan = budget.plan_run(cfg, None, 50_000, 10_000, 10, "cpu", Reporter(), 2.0)
    assert seen == timed and plan.width == width == cfg.width


def test_the_plan_keeps_the_part_of_an_epoch_that_fits() -> None:
    """1.8 epochs of time train 1.8 epochs (2 begun), not 1: rounding down would waste up to an epoch."""
    plan = make_plan("fast", 60, 7.0, {TINY: 19.5}, {TINY: 11.8})
    assert plan.width == TINY and plan.train_epochs == 1.8 and plan.epochs == 2
    assert plan.expected_s <= 60 * budget.SAFETY
    assert budget.planned_steps(plan.to_json(), 196) == 352
    assert budget.planned_steps({"epochs": 3}, 196) == 588  # a plan recorded before fractional epochs


def test_the_narrowest_rung_brings_its_batch_size_and_learning_rate() -> None:
    """A plan on a rung with its own batch size and learning rate records them; the others keep the preset's."""
    small = make_plan("fast", 60, 5.0, EPOCH_S, FINAL_S)
    assert small.width == CHEAP and small.batch_size is None and small.lr is None
    tiny = make_plan("fast", 40, 5.0, {TINY: 5.0}, {TINY: 5.0})
    rung = budget.LADDERS["fast"][-1]
    assert tiny.width == TINY and (tiny.batch_size, tiny.lr) == (rung.batch_size, rung.lr) != (None, None)


def test_a_short_budget_lowers_six_view_tta_to_flip() -> None:
    """flip-translate stays when its pass is cheap next to the budget; else flip; a lower choice is kept."""
    assert budget.final_tta("flip-translate", pass_s=1.0, budget_s=60) == "flip-translate"
    assert budget.final_tta("flip-translate", pass_s=1.5, budget_s=60) == "flip"
    assert budget.final_tta("none", pass_s=9.0, budget_s=60) == "none"
    assert budget.final_tta("flip", pass_s=9.0, budget_s=60) == "flip"


def test_too_small_a_budget_is_one_clear_line() -> None:
    """A budget that cannot hold one epoch says how much would be needed."""
    with pytest.raises(UsageError, match="too small for even one epoch"):
        make_plan("fast", 10, 5.0, EPOCH_S, FINAL_S)
    with pytest.raises(UsageError, match="--model fast or resnet18"):
        make_plan("tutorial", 100, 0.0, EPOCH_S, FINAL_S)


class FakeClock:
    """A clock that advances by the step time, which slows down 3x after `slow_after` steps."""

    def __init__(self, step_s: float, slow_after: int) -> None:
        self.now, self.step_s, self.slow_after, self.steps = 0.0, step_s, slow_after, 0

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        self.steps += 1
        self.now += self.step_s * (3 if self.steps > self.slow_after else 1)


@pytest.mark.parametrize("slow_after", [10, 60, 95])
def test_a_machine_that_slows_mid_run_still_ends_within_ten_percent(slow_after: int) -> None:
    """With a fake clock that slows 3x mid-run, the controller shortens the run to end near the budget."""
    budget_s, final_s = 120.0, 5.0
    clock = FakeClock(step_s=1.0, slow_after=slow_after)
    planned = 100  # 100 steps of 1 s + 5 s final evaluation: fits 120 s at the planned speed
    ctl = BudgetClock(budget_s, final_s, clock=clock)
    done = 0
    while done < ctl.total_steps(done, planned):
        clock.step()
        done += 1
    end = clock.now + final_s
    assert end <= 1.10 * budget_s, (done, end)
    assert done < planned or slow_after >= 95  # it did shorten when the slow-down came early enough


def test_a_steady_machine_runs_every_planned_step() -> None:
    """Without a slow-down, the controller never cuts the plan."""
    clock = FakeClock(step_s=1.0, slow_after=10**9)
    ctl = BudgetClock(200.0, 5.0, clock=clock)
    done = 0
    while done < ctl.total_steps(done, 100):
        clock.step()
        done += 1
    assert done == 100


@pytest.mark.parametrize("option", [["--epochs", "3"], ["--width", "16,32,64"], ["-b", "64"], ["--lr", "0.1"]])
def test_budget_with_an_option_it_plans_is_a_usage_error(tiny_data_dir: Path, tmp_path: Path, option: list[str]) -> None:
    """--budget with --epochs, --width, --batch-size or --lr (all of which it plans for fast) exits 2 with one
    line; so does the tutorial model."""
    result = CliRunner().invoke(app, ["train", "--model", "fast", "--budget", "60", *option,
                                      "--data-dir", str(tiny_data_dir), "-o", str(tmp_path / "r")])
    flag = {"-b": "--batch-size"}.get(option[0], option[0])
    assert result.exit_code == 2 and f"give --budget or {flag}, not both" in result.output
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(app, ["train", "--budget", "60", "--data-dir", str(tiny_data_dir),
                                      "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--model fast or resnet18" in result.output


@pytest.mark.parametrize("nproc", ["2", "3"])
def test_budget_across_processes_is_refused_before_launching(tiny_data_dir: Path, tmp_path: Path, nproc: str) -> None:
    """Ranks timing the machine on their own could plan different runs and hang: --budget with --nproc is exit 2."""
    result = CliRunner().invoke(app, ["train", "--model", "fast", "--budget", "60", "--nproc", nproc,
                                      "--data-dir", str(tiny_data_dir), "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--budget plans for a single process" in result.output
    assert not (tmp_path / "r").exists()


def test_budget_run_plans_records_and_resumes_with_the_same_plan(tiny_data_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """A budgeted run uses, prints and records its plan, stops at its planned step inside the last epoch;
    resuming keeps the plan instead of planning again, with only the time the budget has left."""
    from cifarctl.steppers import AutogradStepper

    # Calibration as if each step took 0.5 s and each evaluated image 1 ms: an epoch (4 steps) is 2 s,
    # the end 3.7 s, so about 3.5 epochs fit 90% of 12 s: 4 epochs begun, the last one cut short.
    monkeypatch.setattr(budget, "_calibrate", lambda cfg, width, *a: (0.5, 0.001))
    monkeypatch.setattr(budget, "LADDERS", {"fast": [budget.Rung("8,8,8", 1)]})
    steps = []
    step = AutogradStepper.__call__
    monkeypatch.setattr(AutogradStepper, "__call__", lambda self, x, y: steps.append(1) or step(self, x, y))
    cfg = train_config("fast", budget=12.0, batch_size=64, seed=0, data_dir=tiny_data_dir,
                       output_dir=tmp_path / "r")
    s = train(cfg, Reporter())
    plan = s["plan"]
    assert plan["width"] == "8,8,8" and 3 < plan["train_epochs"] < 4 and plan["epochs"] == 4
    assert len(steps) == int(plan["train_epochs"] * 4) and s["stop_reason"] == "epochs"
    assert s["epochs"] == 4 and s["tta"] == "flip-translate"
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["plan"] == plan and config["budget"] == 12.0
    elapsed = json.loads(budget_checkpoint_meta(tmp_path / "r"))["elapsed_s"]
    deadlines = []
    init = BudgetClock.__init__
    monkeypatch.setattr(BudgetClock, "__init__", lambda self, deadline_s, *a, **k: deadlines.append(deadline_s)
                        or init(self, deadline_s, *a, **k))
    resumed = train(train_config(), Reporter(), resume=tmp_path / "r", overrides={})
    assert resumed["plan"] == plan
    assert elapsed > 0 and deadlines and deadlines[0] <= 12.0 - elapsed  # only what the budget has left


def budget_checkpoint_meta(run: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        return f.metadata()["cifarctl_checkpoint"]


def test_a_plan_that_timed_the_machine_too_slow_trains_more_epochs_inside_the_budget(
        tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A calibration that caught the machine in a slow moment plans too few epochs; the run adds whole
    epochs, with the schedule stretched to match, and still ends inside its budget."""
    import time

    # Calibration says 0.5 s a step (about 3.5 epochs of 4 steps fit 12 s); real steps take milliseconds.
    monkeypatch.setattr(budget, "_calibrate", lambda cfg, width, *a: (0.5, 0.001))
    monkeypatch.setattr(budget, "LADDERS", {"fast": [budget.Rung("8,8,8", 1)]})
    monkeypatch.setattr(budget, "MAX_EPOCHS", 8)  # the ceiling: 32 steps, which fit easily
    monkeypatch.setattr(budget, "CHECK_EVERY_S", 0.0)
    monkeypatch.setattr(budget, "WARMUP_STEPS", 2)
    t = time.perf_counter()
    s = train(train_config("fast", budget=12.0, batch_size=64, seed=0, data_dir=tiny_data_dir,
                           output_dir=tmp_path / "r"), Reporter())
    assert s["plan"]["epochs"] == 4 and s["epochs"] == s["epochs_run"] == 8
    assert time.perf_counter() - t < 12.0 and s["stop_reason"] == "epochs"
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["epochs"] == 8 and config["plan"] == s["plan"]


@pytest.mark.slow
def test_budget_from_the_command_line_ends_inside_it(tiny_data_dir: Path, tmp_path: Path) -> None:
    """`cifarctl train --model fast --budget 20`, timed as a whole process, ends within 10% of 20 s."""
    import time

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cifarctl", "train", "--model", "fast", "--budget", "20",
                          "--data-dir", str(tiny_data_dir), "-o", str(tmp_path / "r"), "--json"],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    assert out.returncode == 0, out.stderr
    assert wall <= 22.0, wall
    assert "budget 20 s:" in out.stderr and json.loads(out.stdout)["plan"]["epochs"] >= 1


@pytest.mark.parametrize("ceiling", [150, 110])
def test_a_run_ahead_of_its_plan_is_lengthened_into_the_time_it_planned(ceiling: int) -> None:
    """A plan that guessed the machine too slow runs more steps, up to its last epoch's end, ending
    near the planned share of the budget and never past it."""
    clock = FakeClock(step_s=1.0, slow_after=10**9)
    budget_s, final_s, margin = 140.0, 5.0, 14.0
    ctl = BudgetClock(budget_s, final_s, clock=clock, margin_s=margin)
    done = 0
    while done < ctl.total_steps(done, 100, ceiling):
        clock.step()
        done += 1
    assert done == min(ceiling, 121)  # 121 steps + 5 s of evaluation end at 126 s = 140 s less the margin
    assert clock.now + final_s <= budget_s - margin


def test_costly_epoch_ends_do_not_make_a_lengthened_run_collapse(monkeypatch) -> None:
    """A run far ahead of its plan, with epoch ends (scoring, saving) that cost more than many steps, is
    lengthened to its ceiling: the ends it counts are those of epochs that can still happen."""
    monkeypatch.setattr(budget, "CHECK_EVERY_S", 0.0)
    monkeypatch.setattr(budget, "WARMUP_STEPS", 2)
    clock = FakeClock(step_s=0.02, slow_after=10**9)
    ctl = BudgetClock(12.0, 3.6, clock=clock, steps_per_epoch=4, margin_s=1.2)
    done = 0
    while done < ctl.total_steps(done, 14, 32):  # plan 3.5 epochs of 4 steps; at most 8
        clock.step()
        done += 1
        if done % 4 == 0:
            ctl.epoch_ended()
            clock.now += 0.15
            ctl.epoch_started(done)
    assert done == 32 and clock.now + 3.6 <= 12.0 - 1.2


def test_a_passing_slow_spell_gives_the_steps_back() -> None:
    """A machine that is slow for a while and then recovers still runs every planned step that fits."""
    class Spell(FakeClock):
        def step(self) -> None:
            self.steps += 1
            self.now += self.step_s * (3 if 20 < self.steps <= 30 else 1)

    clock = Spell(step_s=1.0, slow_after=0)
    ctl = BudgetClock(140.0, 5.0, clock=clock)
    done = 0
    while done < ctl.total_steps(done, 100):
        clock.step()
        done += 1
    assert done == 100 and clock.now + 5.0 <= 140.0
