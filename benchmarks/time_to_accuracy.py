"""Time to accuracy: `cifarctl train --model fast` (or a --budget) end to end on the real data,
several seeds.

    python benchmarks/time_to_accuracy.py --source ../shared/datasets/cifar10-jpeg.tar.gz --seeds 3
    python benchmarks/time_to_accuracy.py --source ... --seeds 3 --budget 180
    python benchmarks/time_to_accuracy.py --source ... --seeds 1 --model resnet18 --train-args "--epochs 1"

Each seed is one `cifarctl train` process, timed from start to exit as a user waits for it
("wall"). Prints, per seed and as mean/min over seeds: test accuracy (plain and with the preset's
test-time augmentation), wall time of the whole process, training time (the optimisation steps),
images/s and, with --budget, the planned and actual epochs and width.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import import_dataset


def run_seed(args: argparse.Namespace, data_dir: Path, seed: int) -> dict:
    """One whole `cifarctl train` process; its summary plus the wall time."""
    extra = ["--budget", str(args.budget)] if args.budget else []
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "cifarctl", "train", "--model", args.model, "--data-dir", str(data_dir),
         "--seed", str(seed), "-o", str(args.work / f"{args.model}-{seed}"), "--overwrite", "--json", *extra,
         *args.train_args.split()],
        check=True, capture_output=True, text=True).stdout
    return {**json.loads(out), "wall": time.perf_counter() - t}


def describe_plan(summary: dict) -> str:
    """What --budget planned against what ran ('' for a run without a budget)."""
    plan = summary.get("plan")
    if not plan:
        return ""
    epochs = plan.get("train_epochs") or plan["epochs"]
    return (f"  planned {epochs:g} ep{' at ' + plan['width'] if plan['width'] else ''}, ran "
            f"{summary['epochs_run']} ep ({summary['stop_reason']}); estimated {plan['epoch_s']:g} s an epoch, "
            f"start {plan['start_s']:g} s, end {plan['final_eval_s']:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="dataset source for `cifarctl download --source`")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="fast")
    parser.add_argument("--budget", type=float, default=None, help="seconds for `cifarctl train --budget`")
    parser.add_argument("--train-args", default="", help="extra options for cifarctl train, e.g. '--epochs 9'")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cifarctl-tta")
    args = parser.parse_args()

    data_dir = import_dataset(args.source, args.work)
    results = []
    for seed in range(args.seeds):
        s = run_seed(args, data_dir, seed)
        results.append(s)
        print(f"seed {seed}: plain {100 * s['test_accuracy_plain']:.2f}%  {s['tta']} TTA "
              f"{100 * s['test_accuracy']:.2f}%  wall {s['wall']:.1f} s  train {s['train_time_s']:.1f} s  "
              f"{s['images_per_s']:,.0f} img/s  ({s['device']}){describe_plan(s)}", flush=True)

    def col(key: str) -> list[float]:
        return [r[key] for r in results]

    what = f"--budget {args.budget:g}" if args.budget else args.model
    print(f"{what} over {len(results)} seed(s): "
          f"accuracy plain mean {100 * statistics.mean(col('test_accuracy_plain')):.2f}% "
          f"min {100 * min(col('test_accuracy_plain')):.2f}%; "
          f"with TTA mean {100 * statistics.mean(col('test_accuracy')):.2f}% min {100 * min(col('test_accuracy')):.2f}%; "
          f"wall mean {statistics.mean(col('wall')):.1f} s max {max(col('wall')):.1f} s; "
          f"train mean {statistics.mean(col('train_time_s')):.1f} s; {statistics.mean(col('images_per_s')):,.0f} img/s")


if __name__ == "__main__":
    main()
