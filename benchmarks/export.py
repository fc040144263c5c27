"""Export times and predict throughput: PyTorch vs onnxruntime on 1,000 image files.

Writes the first 1,000 test images of DATA_DIR as PNG files, exports WEIGHTS (default: the bundled
model) to ONNX (with and without --tta) and pt2, then times `predict` on the files with each.
The first pass of each is a warm-up; the figure is the best of --repeats passes.

Usage: python benchmarks/export.py --data-dir /tmp/c10data [--weights pretrained] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cifarctl.config import PredictConfig
from cifarctl.data import load_dataset
from cifarctl.export import export_file
from cifarctl.prediction import predict_files
from cifarctl.progress import Reporter


def write_images(data_dir: Path, folder: Path, n: int = 1000) -> list[str]:
    images = np.asarray(load_dataset(data_dir).test.images[:n])
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return [str(folder)]


def time_predict(paths: list[str], weights: Path, repeats: int) -> dict:
    cfg = PredictConfig(paths=paths, weights=weights, device="cpu")
    predict_files(cfg, Reporter())  # warm-up: imports, first-call kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        summary = predict_files(cfg, Reporter())
        best = min(best, time.perf_counter() - start)
    n = len(summary["results"])
    return {"images": n, "seconds": round(best, 3), "images_per_s": round(n / best, 1),
            "classes": [r["class"] for r in summary["results"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--weights", type=Path, default=Path("pretrained"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cifarctl-export-bench-"))
    paths = write_images(args.data_dir, work / "images")
    figures: dict = {"exports": {}}
    for name, fmt, tta in (("onnx", "onnx", False), ("onnx-tta", "onnx", True), ("pt2", "pt2", False)):
        start = time.perf_counter()
        s = export_file(args.weights, fmt, work / f"model-{name}.{fmt}", tta=tta, data_dir=args.data_dir)
        figures["exports"][name] = {"export_s": s["export_s"], "with_verify_s": round(time.perf_counter() - start, 2),
                                    "bytes": s["bytes"], "exporter": s["exporter"], "verify": s["verify"]}
    runs = {"pytorch (weights' TTA)": args.weights, "onnxruntime --tta": work / "model-onnx-tta.onnx",
            "onnxruntime, no TTA": work / "model-onnx.onnx"}
    results = {name: time_predict(paths, w, args.repeats) for name, w in runs.items()}
    same = results["pytorch (weights' TTA)"]["classes"] == results["onnxruntime --tta"]["classes"]
    figures["predict_1000_files"] = {k: {x: v[x] for x in ("images", "seconds", "images_per_s")}
                                     for k, v in results.items()}
    figures["pytorch_and_onnx_tta_same_classes"] = same
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
