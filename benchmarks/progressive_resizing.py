"""Progressive resizing for `fast` on the CPU: train the first epochs on smaller images, the rest at
full size, and compare accuracy and time with the plain recipe (issue 14, item 3).

    python benchmarks/progressive_resizing.py --source ../shared/datasets/cifar10-jpeg.tar.gz \
        --width 16,32,64 --epochs 9 --low-epochs 4 --size 24 --mode scale

Not part of the package: it wraps `TrainBatches.__call__` in this process so that, in the first
--low-epochs epochs, each augmented batch is shrunk to --size pixels, either scaled down (bilinear,
antialiased: the whole image, smaller) or cropped at random (the same scale, less of the image).
The model pools globally, so it takes any size; the last epochs and the test set stay at 32x32.
Prints the test accuracy (plain and with the preset's TTA), training time and the whole process's
time, for one run per invocation; --low-epochs 0 is the plain recipe.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import import_dataset


def shrink_early_epochs(size: int, low_epochs: int, mode: str) -> None:
    """Patch TrainBatches so that batches of epochs < low_epochs come out size x size."""
    import torch.nn.functional as F

    from cifarctl import augment

    original = augment.TrainBatches.__call__

    def call(self, step: int, epoch: int):
        x, idx = original(self, step, epoch)
        if epoch >= low_epochs or size >= self.size:
            return x, idx
        if mode == "scale":
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        else:
            x = augment.random_crop(x, size, self.generator)
        return x.contiguous(memory_format=self.layout), idx

    augment.TrainBatches.__call__ = call


def main() -> None:
    t0 = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="dataset source for `cifarctl download --source`")
    parser.add_argument("--width", default="16,32,64")
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--low-epochs", type=int, default=4, help="epochs trained on smaller images (0: none)")
    parser.add_argument("--size", type=int, default=24, help="side of the smaller images, in pixels")
    parser.add_argument("--mode", choices=["scale", "crop"], default="scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cifarctl-progressive")
    args = parser.parse_args()
    data_dir = import_dataset(args.source, args.work)
    t_start = time.perf_counter()

    import cifarctl

    shrink_early_epochs(args.size, args.low_epochs, args.mode)
    s = cifarctl.train(model="fast", width=args.width, epochs=args.epochs, seed=args.seed, data_dir=data_dir,
                       output_dir=args.work / "run", overwrite=True, progress=False)
    wall = time.perf_counter() - t_start
    print(json.dumps({"width": args.width, "epochs": args.epochs, "low_epochs": args.low_epochs,
                      "size": args.size, "mode": args.mode, "seed": args.seed,
                      "test_accuracy_plain": s.test_accuracy_plain, "test_accuracy": s.test_accuracy,
                      "train_time_s": s.train_time_s, "wall_s": round(wall, 1),
                      "wall_with_import_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
