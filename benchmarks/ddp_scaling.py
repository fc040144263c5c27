"""Data-parallel scaling: one process vs `--nproc N` (gloo on CPU, NCCL on CUDA) at the same global batch.

    python benchmarks/ddp_scaling.py --source ../shared/datasets/cifar10-jpeg.tar.gz --epochs 2
    python benchmarks/ddp_scaling.py --source ... --nproc 1 --train-args "--device cuda"   # NCCL, world size 1

Prints time per epoch (training steps only, from metrics.csv) and final test accuracy for each.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import import_dataset


def run(data_dir: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> tuple[list[float], float]:
    cmd = [sys.executable, "-m", "cifarctl", "train", "--model", args.model, "--data-dir", str(data_dir),
           "--epochs", str(args.epochs), "--seed", "0", "-o", str(out), "--json", *args.train_args.split(), *extra]
    summary = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    with open(out / "metrics.csv", newline="") as f:
        epochs = [float(r["train_s"]) for r in csv.DictReader(f) if r["kind"] == "epoch"]
    return epochs, summary["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--model", default="fast")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=512)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--train-args", default="")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cifarctl-ddp")
    args = parser.parse_args()
    data_dir = import_dataset(args.source, args.work)
    rows = []
    if args.nproc > 1:
        rows.append(("1 process", run(data_dir, args.work / "single", args, ["-b", str(args.global_batch)])))
    per_rank = args.global_batch // args.nproc
    rows.append((f"{args.nproc} processes (torchrun)",
                 run(data_dir, args.work / f"ddp{args.nproc}", args, ["-b", str(per_rank), "--nproc", str(args.nproc)])))
    for name, (epochs, acc) in rows:
        print(f"{name:24s} global batch {args.global_batch}: epoch times {', '.join(f'{t:.1f}' for t in epochs)} s "
              f"(mean {sum(epochs) / len(epochs):.1f} s); test accuracy {100 * acc:.2f}%")


if __name__ == "__main__":
    main()
