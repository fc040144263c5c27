"""Importing image folders: the train/<class>/ + test/<class>/ and <class>/ layouts and Tiny
ImageNet's, decoded in worker processes and streamed to disk in chunks (tensorfile.Spool), so an
import of a million files holds a few thousand decoded images in memory at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from cifarctl.config import MIN_CLASSES
from cifarctl.errors import CifarctlError, UsageError
from cifarctl.images import IMAGE_SUFFIXES, ImageError, load_image_counted, open_regular, walk_files
from cifarctl.progress import Reporter
from cifarctl.tensorfile import Spool

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ALIASES = {"plane": "airplane", "car": "automobile"}
_CHUNK = 1000  # images per decode job: large enough to amortise process round trips
_ROWS = 4096  # images per read while copying or summing a spool


@dataclass
class ImportReport:
    """What an image-folder import changed or could not read."""

    converted: int = 0  # images that were not size x size RGB and were converted and resized
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "error"} per unreadable file
    test_split: float = 0.0  # share held out as test when the folder had no test/


class Spools:
    """The temporary spool files of one import, beside the cache; all deleted when it ends (a
    killed import's are removed by the next one: their names carry the pid)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.made = Path(folder), []

    def new(self, name: str, item_shape: tuple[int, ...], dtype: str) -> Spool:
        spool = Spool(self.folder, f"{len(self.made)}-{name}", item_shape, dtype)
        self.made.append(spool)
        return spool

    def of(self, name: str, array: np.ndarray) -> Spool:
        """A spool holding `array` (already in memory, e.g. an official release's batches)."""
        spool = self.new(name, array.shape[1:], array.dtype.name)
        for start in range(0, len(array), _ROWS):
            spool.append(array[start:start + _ROWS])
        return spool.finish()

    def close(self) -> None:
        for spool in self.made:
            spool.discard()


def chunks(images: Any, rows: int = _ROWS) -> Iterator[np.ndarray]:
    """(k, H, W, 3) pieces of an array, memory map or Spool, in order."""
    for start in range(0, len(images) if not isinstance(images, Spool) else images.count, rows):
        stop = start + rows
        yield images.read(start, stop) if isinstance(images, Spool) else np.asarray(images[start:stop])


@dataclass
class Layout:
    """Where an image folder's splits are: (class name, folder) pairs per split, or one set of
    classes to split by --test-split; files listed explicitly where folders do not say (Tiny
    ImageNet's val/)."""

    class_names: list[str]
    splits: dict[str, list[tuple[int, Path]]]  # split -> (label, folder) pairs
    files: dict[str, list[tuple[int, Path]]] = field(default_factory=dict)  # split -> (label, file)
    roots: dict[str, Path] = field(default_factory=dict)  # split -> its folder, for messages


def find_layout(folder: Path) -> Layout:
    """The layout of an image folder (the given one, or below its only subfolder: a tar's top dir)."""
    for _ in range(3):
        if (folder / "wnids.txt").is_file() and (folder / "train").is_dir():
            return tiny_imagenet_layout(folder)
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return _split_layout(folder)
        subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) != 1:
            break
        folder = subdirs[0]
    if folder.name == "train" or len(_class_dirs(folder)) >= MIN_CLASSES:
        names = class_order(list(_class_dirs(folder)))
        return Layout(names, {"all": _labelled_dirs(folder, names, "all")}, roots={"all": folder})
    raise CifarctlError(f"{folder} has neither train/<class>/ and test/<class>/ folders nor <class>/ folders; "
                        "see `cifarctl download --help`")


def _split_layout(root: Path) -> Layout:
    names = class_order(list(_class_dirs(root / "train")))
    return Layout(names, {s: _labelled_dirs(root / s, names, s) for s in ("train", "test")},
                  roots={s: root / s for s in ("train", "test")})


def _labelled_dirs(split_dir: Path, class_names: list[str], split: str) -> list[tuple[int, Path]]:
    """(label, folder) for each class folder of a split; a class the training split lacks is an error."""
    cifar = class_names == list(CLASSES)

    def label_of(folder_name: str) -> int | None:
        name = ALIASES.get(folder_name.lower(), folder_name.lower()) if cifar else folder_name
        return class_names.index(name) if name in class_names else None

    dirs = _class_dirs(split_dir)
    unknown = sorted(n for n in dirs if label_of(n) is None)
    if unknown:
        raise CifarctlError(f"{split}/ has classes that train/ lacks: {', '.join(unknown)}")
    return [(label_of(n), d) for n, d in dirs.items()]


def tiny_imagenet_layout(root: Path) -> Layout:
    """Tiny ImageNet as it unpacks: wnids.txt (one class id per line), words.txt (id TAB names),
    train/<wnid>/images/*.JPEG, and val/images/ labelled by val/val_annotations.txt (file TAB wnid
    ...). The val split becomes the test split; class names are the first name in words.txt."""
    wnids = [w.strip() for w in _read_small(root / "wnids.txt").splitlines() if w.strip()]
    if len(set(wnids)) != len(wnids):
        raise CifarctlError(f"{root / 'wnids.txt'} lists a class twice")
    words = {}
    if os.path.lexists(root / "words.txt"):
        for line in _read_small(root / "words.txt").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    names = _unique_names([words.get(w) or w for w in wnids], wnids)
    label = {w: i for i, w in enumerate(wnids)}
    train = [(label[w], root / "train" / w) for w in wnids if (root / "train" / w).is_dir()]
    files: dict[str, list[tuple[int, Path]]] = {"test": []}
    notes = root / "val" / "val_annotations.txt"
    if not os.path.lexists(notes):
        raise CifarctlError(f"{root} looks like Tiny ImageNet (wnids.txt) but has no val/val_annotations.txt")
    for line in _read_small(notes).splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip():
            continue
        name, wnid = Path(fields[0].strip()).name, fields[1].strip()  # a bare file name: never a path out
        if wnid not in label:
            raise CifarctlError(f"{notes} names class {wnid!r}, which wnids.txt does not list")
        files["test"].append((label[wnid], root / "val" / "images" / name))
    return Layout(names, {"train": train}, files, {"train": root / "train", "test": root / "val"})


def _unique_names(names: list[str], ids: list[str]) -> list[str]:
    """Class names as given, with the id appended where two classes share a name."""
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n} ({i})" if seen[n] > 1 else n for n, i in zip(names, ids)]


def _read_small(path: Path, limit: int = 16 << 20) -> str:
    """A regular text file of at most `limit` bytes (a list of classes is never bigger); a FIFO or
    device in its place is refused, not opened for a read that could block."""
    try:
        f = open_regular(path)
    except ImageError as err:
        raise CifarctlError(f"{path}: {err}") from err
    with f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CifarctlError(f"{path} is larger than {limit >> 20} MiB; it is not a list of classes")
    return data.decode("utf-8", errors="replace")


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(split_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def class_order(names: list[str]) -> list[str]:
    """CIFAR-10's class order (with its canonical names) when the folders are CIFAR-10's classes,
    else the folder names sorted."""
    canonical = [ALIASES.get(n.lower(), n.lower()) for n in names]
    if sorted(canonical) == sorted(CLASSES):
        return list(CLASSES)
    return sorted(names)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices: `fraction` of each class's indices (rounded, at least one when the
    class has two or more) held out, chosen by a seeded shuffle; both sorted."""
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n = min(max(round(fraction * len(idx)), 1 if len(idx) > 1 else 0), len(idx) - 1) if fraction else 0
        held.append(rng.permutation(idx)[:n])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_idx)
    return kept, held_idx


def import_folder(folder: Path, spools: Spools, reporter: Reporter, report: ImportReport, *, size: int,
                  test_split: float, split_seed: int) -> tuple[dict[str, Spool], list[str]]:
    """Decode an image folder into spools train_images (N, size, size, 3) uint8, train_labels (N,)
    int64, test_*; returns them and the class names."""
    layout = find_layout(folder)
    parts = {}
    for split in ("train", "test", "all"):
        if split in layout.splits or split in layout.files:
            images, labels = _import_split(layout, split, spools, reporter, report, size)
            parts[split] = (images, labels)
    if "all" not in parts:
        return {f"{s}_{k}": v for s, (i, lab) in parts.items() for k, v in (("images", i), ("labels", lab))}, \
            layout.class_names
    if not 0 < test_split < 1:
        raise UsageError(f"--test-split must be between 0 and 1, not {test_split}")
    images, labels = parts["all"]
    label_array = np.concatenate(list(chunks(labels)))
    kept, held = stratified_split(label_array, test_split, split_seed)
    report.test_split = test_split
    return {"train_images": _select(images, kept, spools, "train_images"),
            "train_labels": spools.of("train_labels", label_array[kept]),
            "test_images": _select(images, held, spools, "test_images"),
            "test_labels": spools.of("test_labels", label_array[held])}, layout.class_names


def _select(source: Spool, rows: np.ndarray, spools: Spools, name: str) -> Spool:
    """The rows (sorted indices) of a spool, copied in order into a new one, a chunk at a time."""
    out = spools.new(name, source.item_shape, source.dtype.name)
    for start in range(0, source.count, _ROWS):
        lo, hi = np.searchsorted(rows, [start, start + _ROWS])
        if hi > lo:
            out.append(source.read(start, start + _ROWS)[rows[lo:hi] - start])
    return out.finish()


def _import_split(layout: Layout, split: str, spools: Spools, reporter: Reporter, report: ImportReport,
                  size: int) -> tuple[Spool, Spool]:
    """Decode one split's files into an images spool and a labels spool."""
    files, labels = [], []
    for label, d in layout.splits.get(split, []):
        found, problems = walk_files(d, IMAGE_SUFFIXES)  # FIFOs, devices and link loops are reported
        report.skipped.extend({"path": p.path, "error": p.error} for p in problems)
        files += found
        labels += [label] * len(found)
    for label, path in layout.files.get(split, []):
        files.append(path)
        labels.append(label)
    where = layout.roots.get(split, split)
    if not files:
        raise CifarctlError(f"no images in {where}; expected <class>/ folders with {', '.join(IMAGE_SUFFIXES)} files")
    images = spools.new(f"{split}_images", (size, size, 3), "uint8")
    ok = _decode_all([str(f) for f in files], f"importing {split}", reporter, report, images, size)
    if not len(ok):
        raise CifarctlError(f"none of the images in {where} could be read")
    return images.finish(), spools.of(f"{split}_labels", np.asarray(labels, dtype=np.int64)[ok])


def _decode_chunk(paths: list[str], size: int) -> tuple[np.ndarray, list[int], int, list[dict[str, str]]]:
    """Decode image files to (k, size, size, 3) uint8 with the pipeline `predict` uses; returns the
    images, the indices that worked, how many needed converting, and the failures."""
    out, ok, converted, failed = [], [], 0, []
    for i, path in enumerate(paths):
        try:
            image, was_converted = load_image_counted(path, size)
        except ImageError as err:
            failed.append({"path": path, "error": str(err)})
            continue
        out.append(image)
        ok.append(i)
        converted += was_converted
    images = np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)
    return images, ok, converted, failed


def _decode_all(paths: list[str], description: str, reporter: Reporter, report: ImportReport, spool: Spool,
                size: int) -> np.ndarray:
    """Decode `paths` in order into `spool`; returns the indices of the files that worked. At most
    two chunks per worker are in flight, so memory stays O(chunk) however many files there are."""
    jobs = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    workers = min(os.cpu_count() or 1, 8, len(jobs))
    decode = partial(_decode_chunk, size=size)
    ok: list[int] = []
    with reporter.task(description, len(paths)) as task:
        if workers > 1:
            # spawn, not fork: the parent may hold threads (progress display) that fork would copy mid-lock.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                pending = [pool.submit(decode, job) for job in jobs[:2 * workers]]
                for n in range(len(jobs)):
                    result = pending[n].result()
                    pending[n] = None  # drop the finished result: only the window stays referenced
                    if n + 2 * workers < len(jobs):
                        pending.append(pool.submit(decode, jobs[n + 2 * workers]))
                    _collect(result, n * _CHUNK, spool, ok, report, task)
        else:
            for n, job in enumerate(jobs):
                _collect(decode(job), n * _CHUNK, spool, ok, report, task)
    return np.asarray(ok, dtype=np.int64)


def _collect(result: Any, start: int, spool: Spool, ok: list[int], report: ImportReport, task: Any) -> None:
    images, idx, converted, failed = result
    spool.append(images)
    ok.extend(start + i for i in idx)
    report.converted += converted
    report.skipped.extend(failed)
    task.advance(len(idx) + len(failed))
