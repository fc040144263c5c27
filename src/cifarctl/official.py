"""The official CIFAR releases (python pickles): where each comes from, how to recognise its
archive, and how to read its batches into uint8 HWC arrays with the restricted unpickler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifarctl.archive import load_pickle_batch
from cifarctl.config import (CIFAR10_BYTES, CIFAR10_MD5, CIFAR10_URL, CIFAR100_BYTES, CIFAR100_MD5,
                             CIFAR100_URL)
from cifarctl.errors import CifarctlError


@dataclass(frozen=True)
class Release:
    """One official dataset: its archive and which pickled fields hold its labels and class names."""

    name: str
    url: str
    md5: str
    size: int  # bytes of the archive, a hard ceiling for the download
    folder: str  # the archive's top folder
    meta_file: str
    names_key: str  # in the meta pickle
    labels_key: str  # in each batch pickle
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]


RELEASES = {
    "cifar10": Release("cifar10", CIFAR10_URL, CIFAR10_MD5, CIFAR10_BYTES, "cifar-10-batches-py", "batches.meta",
                       "label_names", "labels", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)),
    # CIFAR-100's 100 fine classes; its 20 superclasses are the dataset "cifar100-coarse", built
    # from the same archive.
    "cifar100": Release("cifar100", CIFAR100_URL, CIFAR100_MD5, CIFAR100_BYTES, "cifar-100-python", "meta",
                        "fine_label_names", "fine_labels", ("train",), ("test",)),
    "cifar100-coarse": Release("cifar100-coarse", CIFAR100_URL, CIFAR100_MD5, CIFAR100_BYTES, "cifar-100-python",
                               "meta", "coarse_label_names", "coarse_labels", ("train",), ("test",)),
}


def release_of_archive(member_names: list[str], dataset: str) -> Release | None:
    """The official release whose layout these tar member names show (for `dataset` when both
    CIFAR-100 variants match), or None for anything else (an image-folder archive)."""
    found = None
    for release in RELEASES.values():
        marker = f"{release.folder}/{release.train_files[0]}"
        if any(n.rstrip("/").endswith(marker) for n in member_names):
            found = found or release
            if release.name == dataset:
                return release
    return found


def read_release(folder: Path, release: Release) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read an unpacked release's train and test batches: arrays train_images (N, 32, 32, 3)
    uint8, train_labels (N,) int64, test_*; and the class names."""
    meta = load_pickle_batch(folder / release.meta_file) if (folder / release.meta_file).is_file() else {}
    names = meta.get(release.names_key)
    class_names = [str(n) for n in names] if isinstance(names, list) else []
    if not class_names:
        raise CifarctlError(f"{release.meta_file} has no {release.names_key}; the archive is not {release.name}")
    arrays = {}
    for split, files in (("train", release.train_files), ("test", release.test_files)):
        parts = [_read_batch(folder / name, release.labels_key) for name in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and not (labels.min() >= 0 and labels.max() < len(class_names)):
            raise CifarctlError(f"{split} labels fall outside the {len(class_names)} classes")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays, class_names


def _read_batch(path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (images (n, 32, 32, 3) uint8, labels (n,) int64), every field checked."""
    if not path.is_file():
        raise CifarctlError(f"{path.name} is missing from the archive; re-download it")
    batch = load_pickle_batch(path)
    data, lab = batch.get("data"), batch.get(labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CifarctlError(f"{path.name}: 'data' is not a uint8 array of rows of 3072")
    if not isinstance(lab, list) or len(lab) != len(data):
        raise CifarctlError(f"{path.name}: {labels_key!r} is not a list as long as 'data'")
    try:
        labels = np.asarray(lab, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise CifarctlError(f"{path.name}: {labels_key!r} are not whole numbers ({err})") from err
    # Rows are channel-major (R plane, G plane, B plane); the cache is HWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels
