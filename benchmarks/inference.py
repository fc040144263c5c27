"""Inference throughput: `cifarctl predict` on N JPEG files and `cifarctl evaluate` on the test
set, whole process and inner time, plus a profile of predict's stages.

    python benchmarks/inference.py --source ../shared/datasets/cifar10-jpeg.tar.gz --weights runs/latest --files 1000 10000

The JPEG files are the test images of --source unpacked once under --work (not timed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import import_dataset

from cifarctl.archive import safe_extract


def timed(cmd: list[str]) -> tuple[float, dict]:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode not in (0, 1):
        raise SystemExit(out.stderr)
    return wall, json.loads(out.stdout)


def stages(files: list[Path], weights: str) -> dict[str, float]:
    """Seconds per stage of predict, in-process: load the weights, decode the files, run the model."""
    from cifarctl.images import load_images
    from cifarctl.metrics import predict_logits
    from cifarctl.rundir import weights_file
    from cifarctl.weights import load_weights

    t0 = time.perf_counter()
    w = load_weights(weights_file(Path(weights)))
    t1 = time.perf_counter()
    images, _, _ = load_images(files)
    t2 = time.perf_counter()
    predict_logits(w, images, 256)
    t3 = time.perf_counter()
    return {"load weights": t1 - t0, "decode + resize": t2 - t1, "model (with TTA)": t3 - t2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--files", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cifarctl-inference")
    args = parser.parse_args()
    data_dir = import_dataset(args.source, args.work)
    folder = args.work / "images"
    if not folder.exists():
        safe_extract(Path(args.source), folder)
    test = sorted(next(folder.rglob("test")).rglob("*.jpg"))
    for n in args.files:
        files = [str(p) for p in test[:n]]
        wall, s = timed([sys.executable, "-m", "cifarctl", "predict", *files, "-w", args.weights, "--json"])
        print(f"predict {len(s['results']):,} JPEG files: {wall:.2f} s whole process, "
              f"{len(s['results']) / wall:,.0f} images/s", flush=True)
        parts = stages([Path(f) for f in files], args.weights)
        print("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()), flush=True)
    wall, s = timed([sys.executable, "-m", "cifarctl", "evaluate", args.weights, "--data-dir", str(data_dir), "--json"])
    print(f"evaluate {s['images']:,} test images: {wall:.2f} s whole process, {s['time_s']:.2f} s inner "
          f"({s['images_per_s']:,.0f} images/s inner, {s['images'] / wall:,.0f} whole); accuracy "
          f"{100 * s['accuracy']:.2f}%")


if __name__ == "__main__":
    main()
