"""Time to accuracy: `cifarctl train --model fast` end to end on the real data, several seeds.

    python benchmarks/time_to_accuracy.py --source ../shared/datasets/cifar10-jpeg.tar.gz --seeds 3
    python benchmarks/time_to_accuracy.py --source ... --seeds 1 --model resnet18 --train-args "--epochs 1"

Each seed is one `cifarctl train` process. Prints, per seed and as mean/min over seeds: test accuracy
(plain and with the preset's test-time augmentation), training time (the optimisation steps,
from the run's summary), wall time of the whole process (imports, data loading, evaluation,
files) and images/s.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="dataset source for `cifarctl download --source`")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="fast")
    parser.add_argument("--train-args", default="", help="extra options for cifarctl train, e.g. '--epochs 9'")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cifarctl-tta")
    args = parser.parse_args()

    data_dir = import_dataset(args.source, args.work)
    results = []
    for seed in range(args.seeds):
        t = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "cifarctl", "train", "--model", args.model, "--data-dir", str(data_dir),
             "--seed", str(seed), "-o", str(args.work / f"{args.model}-{seed}"), "--json", *args.train_args.split()],
            check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - t
        s = json.loads(out)
        results.append((s["test_accuracy_plain"], s["test_accuracy"], s["train_time_s"], wall, s["images_per_s"]))
        print(f"seed {seed}: plain {100 * s['test_accuracy_plain']:.2f}%  {s['tta']} TTA "
              f"{100 * s['test_accuracy']:.2f}%  train {s['train_time_s']:.1f} s  wall {wall:.1f} s  "
              f"{s['images_per_s']:,.0f} img/s  ({s['device']})", flush=True)

    def col(i: int) -> list[float]:
        return [r[i] for r in results]

    print(f"{args.model} over {len(results)} seed(s): "
          f"accuracy plain mean {100 * statistics.mean(col(0)):.2f}% min {100 * min(col(0)):.2f}%; "
          f"with TTA mean {100 * statistics.mean(col(1)):.2f}% min {100 * min(col(1)):.2f}%; "
          f"train time mean {statistics.mean(col(2)):.1f} s max {max(col(2)):.1f} s; "
          f"wall mean {statistics.mean(col(3)):.1f} s; {statistics.mean(col(4)):,.0f} img/s")


if __name__ == "__main__":
    main()
