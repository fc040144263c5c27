"""Import speed: `cifarctl download --source DIR --name NAME` on a folder of generated photos of
mixed sizes and formats, whole process, in images/s.

    python benchmarks/import_speed.py --images 10000

The photos (JPEG and PNG, 64x48 to 640x480, RGB, greyscale and RGBA) are generated once under
--work, as a <class>/ tree split by the default --test-split 0.2 (not timed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(64, 48), (160, 120), (320, 240), (640, 480), (500, 500), (96, 128)]
MODES = ["RGB", "L", "RGBA"]


def generate(root: Path, n: int, classes: int = 10) -> None:
    """n photos in root/<class>/: smooth random gradients (JPEG compresses them like photos)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        mode = MODES[i % len(MODES)]
        base = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR).convert(mode)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        if mode == "RGBA":
            im.save(folder / f"{i:05d}.png")
        else:
            im.save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cifarctl-import")
    args = parser.parse_args()
    photos = args.work / f"photos-{args.images}"
    if not photos.exists():
        generate(photos, args.images)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cifarctl", "download", "--source", str(photos), "--name", "photos",
                          "--data-dir", str(args.work / "data"), "--force", "--json"],
                         check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    s = json.loads(out)
    n = s["splits"]["train"]["images"] + s["splits"]["test"]["images"]
    print(f"imported {n:,} photos ({s['converted']:,} converted, {len(s['skipped'])} skipped) in {wall:.1f} s "
          f"whole process: {n / wall:,.0f} images/s")


if __name__ == "__main__":
    main()
