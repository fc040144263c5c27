"""Scale with the data: peak memory and speed of `cifarctl train` and `download` as the dataset grows.

    python benchmarks/scale.py
    python benchmarks/scale.py --sizes 50000,1000000 --skip-import --skip-64
    python benchmarks/scale.py --import-files 50000 --skip-train --skip-64 --json
    python benchmarks/scale.py --size64-classes 100 --size64-epochs 8 --train-args "--batch-size 256"

All data are synthetic, written once under --work and reused by later runs (generation is not
timed). Every measured command is one process run under `/usr/bin/time -v`, timed from start to
exit ("wall"); its peak RSS is that of its largest single process, not a sum over workers.

  train     one epoch of `--model fast` on N random 32x32 images with random labels, per N in
            --sizes: peak RSS, the cache file's size and peak RSS minus that size (the cost beyond
            holding the data once), wall, training time, process time and images/s.
  import    `cifarctl download --source DIR --name NAME` of --import-files random 32x32 PNGs laid
            out train/<class>/ and test/<class>/: peak RSS, wall, images/s and the cache's size.
  64x64     `cifarctl train --model fast` on a learnable 64x64 set (one 8x8 colour pattern per
            class, blown up, shifted and noised): test accuracy, wall, training time, images/s
            and peak RSS.

A part whose command fails reports the command's last stderr line and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cifarctl.data import list_datasets, save_cache

TIME = "/usr/bin/time"
CLASSES = 10
TEST_IMAGES = 10_000
CHUNK = 50_000  # images generated per step, so that only the output array is ever large
MIB = 1 << 20


def machine() -> dict[str, Any]:
    """CPU count and model, total memory and torch version of this machine."""
    cpu = platform.processor()
    mem = None
    # outside Linux there is no /proc: the field stays as platform gives it, or unknown
    with contextlib.suppress(OSError, StopIteration):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    with contextlib.suppress(OSError, StopIteration):
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
        mem = kb * 1024
    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return {"cpus": os.cpu_count(), "cpu": cpu or "unknown", "memory_bytes": mem, "torch": torch,
            "python": platform.python_version()}


def note(text: str) -> None:
    """Progress on stderr, so that --json's stdout stays one object."""
    print(f"... {text}", file=sys.stderr, flush=True)


def timed(cmd: list[str], work: Path) -> dict[str, Any]:
    """Run cmd under /usr/bin/time -v; wall time, peak RSS, stdout, and the error if it failed."""
    report = work / ".time-report"
    report.unlink(missing_ok=True)  # a stale report would give a failed run the last run's memory
    t = time.perf_counter()
    # -o keeps time's report apart from the command's own stderr, whose last line is the error
    proc = subprocess.run([TIME, "-v", "-o", str(report), *cmd], check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t
    rss = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        rss = next(int(line.rsplit(":", 1)[1]) * 1024 for line in report.read_text().splitlines()
                   if "Maximum resident set size" in line)
    out = {"wall_s": round(wall, 2), "peak_rss_bytes": rss, "stdout": proc.stdout, "error": None}
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        out["error"] = f"exit {proc.returncode}: {lines[-1].strip() if lines else 'no stderr'}"
    return out


def parse_json(res: dict[str, Any]) -> dict[str, Any]:
    """The command's --json summary; an unparsable stdout becomes the result's error."""
    if res["error"]:
        return {}
    try:
        return json.loads(res["stdout"])
    except json.JSONDecodeError:
        res["error"] = f"stdout is not JSON: {res['stdout'].strip()[-200:]!r}"
        return {}


def cached(data_dir: Path, name: str, train: int, test: int, classes: int) -> bool:
    """Whether data_dir already holds a readable cache `name` with these counts."""
    if not data_dir.is_dir():
        return False
    return any(d["name"] == name and d["status"] == "ok" and d.get("train") == train and d.get("test") == test
               and d.get("classes") == classes for d in list_datasets(data_dir))


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    """n random uint8 images, generated chunk-wise into one preallocated array."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        out[start:stop] = rng.integers(0, 256, size=(stop - start, size, size, 3), dtype=np.uint8)
    return out


def write_random_cache(data_dir: Path, name: str, n: int) -> Path:
    """Cache `name`: n random 32x32 training images with random labels, plus TEST_IMAGES test images."""
    path = data_dir / f"{name}.safetensors"
    if cached(data_dir, name, n, TEST_IMAGES, CLASSES):
        return path
    note(f"writing synthetic cache {name} ({n:,} images, not timed)")
    rng = np.random.default_rng(1)
    arrays = {"train_images": random_images(n, 32, 0), "train_labels": rng.integers(0, CLASSES, n, dtype=np.int64),
              "test_images": random_images(TEST_IMAGES, 32, 2),
              "test_labels": rng.integers(0, CLASSES, TEST_IMAGES, dtype=np.int64)}
    return save_cache(data_dir, name, arrays, [f"class{c}" for c in range(CLASSES)], source="synthetic")


def train_cmd(args: argparse.Namespace, dataset: str, epochs: int) -> list[str]:
    """`cifarctl train --model fast` on `dataset`, with --train-args appended."""
    return [sys.executable, "-m", "cifarctl", "train", "--model", "fast", "--epochs", str(epochs),
            "--dataset", dataset, "--data-dir", str(args.work / "data"), "-o", str(args.work / "runs" / dataset),
            "--overwrite", "--json", "--seed", "0", *shlex.split(args.train_args)]


def train_row(res: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The fields of one timed `cifarctl train` kept in the results."""
    return {"wall_s": res["wall_s"], "peak_rss_bytes": res["peak_rss_bytes"], "error": res["error"],
            "train_time_s": summary.get("train_time_s"), "process_s": summary.get("process_s"),
            "images_per_s": summary.get("images_per_s"), "test_accuracy": summary.get("test_accuracy"),
            "device": summary.get("device")}


def part_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One epoch of `--model fast` per size in --sizes."""
    rows = []
    for n in args.sizes:
        name = f"synth-{n}"
        cache = write_random_cache(args.work / "data", name, n)
        note(f"cifarctl train on {name}")
        res = timed(train_cmd(args, name, 1), args.work)
        row = {"images": n, **train_row(res, parse_json(res)), "cache_bytes": cache.stat().st_size}
        rss = row["peak_rss_bytes"]
        row["rss_minus_cache_bytes"] = rss - row["cache_bytes"] if rss is not None else None
        rows.append(row)
    return rows


def _write_pngs(job: tuple[Path, int, int]) -> None:
    """Files start..stop-1 of the import folder (a Pool task): class i % 10, every 6th in test/."""
    root, start, stop = job
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        split = "test" if i % 6 == 0 else "train"
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / f"class{i % CLASSES}" / f"{i}.png", format="PNG",
                                     compress_level=1)


def write_png_folder(work: Path, files: int) -> Path:
    """work/files-<F>/{train,test}/<class>/<i>.png, made once; a marker says it is complete."""
    root = work / f"files-{files}"
    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(files):
        return root
    for split in ("train", "test"):
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
    note(f"writing {files:,} PNG files under {root} (not timed)")
    step = 2_000
    with Pool(2) as pool:
        pool.map(_write_pngs, [(root, s, min(s + step, files)) for s in range(0, files, step)])
    marker.write_text(f"{files}\n")
    return root


def part_import(args: argparse.Namespace) -> dict[str, Any]:
    """`cifarctl download` of a folder of --import-files small PNGs."""
    files = args.import_files
    folder = write_png_folder(args.work, files)
    name = f"import-{files}"
    note(f"cifarctl download of {folder}")
    res = timed([sys.executable, "-m", "cifarctl", "download", "--source", str(folder), "--name", name,
                 "--data-dir", str(args.work / "data"), "--force", "--json"], args.work)
    summary = parse_json(res)
    images = sum(s["images"] for s in summary["splits"].values()) if summary else files
    cache = Path(summary.get("cache") or args.work / "data" / f"{name}.safetensors")
    return {"files": files, "images": images, "wall_s": res["wall_s"], "peak_rss_bytes": res["peak_rss_bytes"],
            "images_per_s": round(images / res["wall_s"], 1) if not res["error"] else None,
            "cache_bytes": cache.stat().st_size if cache.is_file() and not res["error"] else None,
            "error": res["error"]}


def pattern_images(labels: np.ndarray, patterns: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each label's 64x64 pattern, shifted by up to 4 px each way and noised."""
    padded = np.pad(patterns, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="wrap")
    shifts = rng.integers(0, 9, size=(len(labels), 2))
    out = np.empty((len(labels), 64, 64, 3), dtype=np.uint8)
    for i, (label, (dy, dx)) in enumerate(zip(labels, shifts, strict=True)):
        out[i] = padded[label, dy:dy + 64, dx:dx + 64]
    for start in range(0, len(out), CHUNK):
        chunk = out[start:start + CHUNK].astype(np.int16)
        chunk += rng.integers(-40, 41, size=chunk.shape, dtype=np.int16)
        out[start:start + CHUNK] = np.clip(chunk, 0, 255)
    return out


def write_pattern_cache(data_dir: Path, classes: int, train: int, test: int) -> Path:
    """Cache "synth64": a learnable 64x64 set, one random 8x8 colour pattern per class, balanced labels."""
    if cached(data_dir, "synth64", train, test, classes):
        return data_dir / "synth64.safetensors"
    note(f"writing synthetic cache synth64 ({train:,} + {test:,} 64x64 images, not timed)")
    rng = np.random.default_rng(64)
    # 8x8 cells of 8x8 px: a shift of at most 4 px keeps most of each cell, so the class stays visible
    patterns = np.kron(rng.integers(0, 256, size=(classes, 8, 8, 3), dtype=np.uint8),
                       np.ones((1, 8, 8, 1), dtype=np.uint8))
    train_labels = np.arange(train, dtype=np.int64) % classes
    test_labels = np.arange(test, dtype=np.int64) % classes
    arrays = {"train_images": pattern_images(train_labels, patterns, rng), "train_labels": train_labels,
              "test_images": pattern_images(test_labels, patterns, rng), "test_labels": test_labels}
    return save_cache(data_dir, "synth64", arrays, [f"pattern{c}" for c in range(classes)], source="synthetic")


def part_64(args: argparse.Namespace) -> dict[str, Any]:
    """`cifarctl train --model fast` on the 64x64 pattern set."""
    write_pattern_cache(args.work / "data", args.size64_classes, args.size64_train, args.size64_test)
    note("cifarctl train on synth64")
    res = timed(train_cmd(args, "synth64", args.size64_epochs), args.work)
    return {"classes": args.size64_classes, "train": args.size64_train, "test": args.size64_test,
            "epochs": args.size64_epochs, **train_row(res, parse_json(res))}


def fmt(value: Any, spec: str = ",.1f", scale: float = 1) -> str:
    """A table cell: value / scale formatted by spec, or "-" when unknown."""
    return "-" if value is None else format(value / scale, spec)


def table(title: str, header: list[str], rows: list[list[str]], errors: list[str | None]) -> None:
    """A fixed-width plain-text table, each row followed by its error, if any."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row, error in zip(rows, errors, strict=True):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if error:
            print(f"  failed: {error}")


def print_train(rows: list[dict[str, Any]]) -> None:
    """The dataset-size table: memory against cache size, and speed."""
    header = ["images", "cache MiB", "peak RSS MiB", "RSS-cache MiB", "wall s", "train s", "process s", "img/s",
              "device"]
    cells = [[f"{r['images']:,}", fmt(r["cache_bytes"], ",.1f", MIB), fmt(r["peak_rss_bytes"], ",.0f", MIB),
              fmt(r["rss_minus_cache_bytes"], ",.0f", MIB), fmt(r["wall_s"]), fmt(r["train_time_s"]),
              fmt(r["process_s"]), fmt(r["images_per_s"], ",.0f"), r["device"] or "-"] for r in rows]
    table("train: 1 epoch of --model fast, 32x32 random images and labels, 10 classes, 10,000 test images",
          header, cells, [r["error"] for r in rows])


def print_import(r: dict[str, Any]) -> None:
    """The import table: one `cifarctl download` of a PNG folder."""
    header = ["files", "images", "wall s", "img/s", "peak RSS MiB", "cache MiB"]
    cells = [f"{r['files']:,}", f"{r['images']:,}", fmt(r["wall_s"]), fmt(r["images_per_s"], ",.0f"),
             fmt(r["peak_rss_bytes"], ",.0f", MIB), fmt(r["cache_bytes"], ",.1f", MIB)]
    table("import: cifarctl download of a folder of random 32x32 PNGs (train/<class>/, test/<class>/)",
          header, [cells], [r["error"]])


def print_64(r: dict[str, Any]) -> None:
    """The 64x64 table: accuracy and speed of one training run."""
    header = ["classes", "train", "test", "epochs", "test acc %", "wall s", "train s", "img/s", "peak RSS MiB",
              "device"]
    cells = [f"{r['classes']:,}", f"{r['train']:,}", f"{r['test']:,}", str(r["epochs"]),
             fmt(r["test_accuracy"], ".2f", 0.01), fmt(r["wall_s"]), fmt(r["train_time_s"]),
             fmt(r["images_per_s"], ",.0f"), fmt(r["peak_rss_bytes"], ",.0f", MIB), r["device"] or "-"]
    table("64x64: --model fast on a learnable set (a shifted, noised 8x8 colour pattern per class)",
          header, [cells], [r["error"]])


def sizes(text: str) -> list[int]:
    """--sizes: comma-separated image counts."""
    return [int(s) for s in text.split(",") if s.strip()]


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default=[50_000, 200_000, 1_000_000],
                        help="training-set sizes for the train part (default 50000,200000,1000000)")
    parser.add_argument("--import-files", type=int, default=200_000, help="PNG files for the import part")
    parser.add_argument("--size64-classes", type=int, default=200)
    parser.add_argument("--size64-train", type=int, default=20_000)
    parser.add_argument("--size64-test", type=int, default=2_000)
    parser.add_argument("--size64-epochs", type=int, default=4)
    parser.add_argument("--train-args", default="",
                        help="extra options for every cifarctl train, e.g. '--batch-size 256'")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cifarctl-scale",
                        help="generated data, caches and runs; reused, so generation is paid once")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-import", action="store_true")
    parser.add_argument("--skip-64", action="store_true")
    parser.add_argument("--json", action="store_true", help="print all results as one JSON object")
    return parser.parse_args()


def main() -> None:
    """Run the parts not skipped; a table each as it ends, or one JSON object at the end."""
    args = parse_args()
    if not shutil.which(TIME):
        sys.exit(f"{TIME} is needed for peak memory (GNU time; apt-get install time)")
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "synthetic": True, "work": str(args.work)}
    if not args.json:
        m = results["machine"]
        mem = fmt(m["memory_bytes"], ".1f", 1 << 30)
        print(f"machine: {m['cpus']} CPUs ({m['cpu']}), {mem} GiB memory; torch {m['torch']}, "
              f"python {m['python']}")
        print(f"data: synthetic (random pixels, and for 64x64 a pattern per class), under {args.work}", flush=True)
    parts = [("train", args.skip_train, part_train, print_train),
             ("import", args.skip_import, part_import, print_import),
             ("size64", args.skip_64, part_64, print_64)]
    for key, skip, run, show in parts:
        if skip:
            continue
        results[key] = run(args)
        if not args.json:
            show(results[key])
            sys.stdout.flush()
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
