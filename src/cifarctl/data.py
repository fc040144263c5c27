"""Datasets on disk: download or import once, verify, and cache each named dataset as uint8
tensors in one safetensors file (DATA_DIR/<name>.safetensors) that every other command loads in
well under a second. CIFAR-10, CIFAR-100 (fine or coarse labels) and any image folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cifarctl import fsutil, tensorfile
from cifarctl.archive import safe_extract, tar_names
from cifarctl.config import (DEFAULT_DATASET, MAX_CLASSES, MIN_CLASSES, DownloadConfig, check_dataset_name)
from cifarctl.errors import CifarctlError, UsageError
from cifarctl.fetch import fetch, md5_file
from cifarctl.folders import ALIASES, CLASSES, ImportReport, Spools, chunks, import_folder, stratified_split
from cifarctl.official import RELEASES, Release, read_release, release_of_archive
from cifarctl.progress import Reporter
from cifarctl.tensorfile import Spool

__all__ = ["ALIASES", "CLASSES", "Dataset", "Split", "dataset_stats", "ensure_dataset", "list_datasets",
           "load_dataset", "save_cache", "stratified_split"]

SPLITS = ("train", "test")
CACHE_NAME = "cifar10.safetensors"  # the CIFAR-10 cache; every dataset's is <name>.safetensors
CACHE_SUFFIX = ".safetensors"
CACHE_FORMAT = "cifarctl-dataset"
FORMAT_VERSION = "1"
SIZE = 32  # CIFAR's image side; other datasets record theirs as image_size
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 512


@dataclass
class Split:
    """One split as arrays: images (N, 32, 32, 3) uint8 HWC, labels (N,) int64."""

    images: Any
    labels: Any

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """Both splits plus the class names and provenance stored with the cache."""

    train: Split
    test: Split
    class_names: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    pages: tensorfile.Pages | None = None  # the cache's memory map, when the images are read from one

    def release_pages(self) -> None:
        """Drop this process's resident pages of the cache's map (see tensorfile.Pages.release)."""
        if self.pages is not None:
            self.pages.release()

    def split(self, name: str) -> Split:
        """The split called `name` ("train" or "test")."""
        if name not in SPLITS:
            raise CifarctlError(f"unknown split {name!r}; use train or test")
        return getattr(self, name)


def cache_path(data_dir: Path, dataset: str = DEFAULT_DATASET) -> Path:
    """Where dataset `dataset`'s tensor cache lives inside a data dir."""
    return Path(data_dir) / f"{check_dataset_name(dataset)}{CACHE_SUFFIX}"


class _InvalidCache(Exception):
    pass


def _as_numpy(a: Any) -> np.ndarray:
    return np.ascontiguousarray(a.numpy() if hasattr(a, "numpy") else a)


def _content_md5(arrays: dict[str, Any]) -> str:
    """md5 over every array's name and bytes, in name order (caches written before crc32 digests)."""
    h = hashlib.md5()
    for name in sorted(arrays):
        a = _as_numpy(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _check_content(meta: dict[str, str], arrays: dict[str, Any], path: Path) -> None:
    """Raise _InvalidCache when the arrays do not match the digests recorded with them."""
    if meta.get("crc32"):
        try:
            expected = json.loads(meta["crc32"])
        except ValueError as err:
            raise _InvalidCache("its checksums are unreadable") from err
        if expected != tensorfile.crc32s(path, list(arrays)):
            raise _InvalidCache("its contents do not match their checksums")
    elif meta.get("content_md5") and _content_md5(arrays) != meta["content_md5"]:
        raise _InvalidCache("its contents do not match their checksum")


def image_size_of(meta: dict[str, str]) -> int:
    """The side of a cache's square images: recorded since 64x64 datasets, else CIFAR's 32."""
    try:
        size = int(meta.get("image_size", SIZE))
    except ValueError as err:
        raise _InvalidCache("its image_size is not a number") from err
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise _InvalidCache(f"its image_size {size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    return size


def _read_cache(path: Path, framework: str, verify: bool = True) -> Dataset:
    """Open and check a cache file; raises _InvalidCache naming what is wrong. The images stay
    memory-mapped (pages are read when used); the labels are read into memory. `verify` also
    recomputes the content checksums, which reads every byte."""
    try:
        arrays, meta, pages = tensorfile.load_mapped(path, framework)
    except tensorfile.TensorFileError as err:
        raise _InvalidCache(str(err)) from err
    if meta.get("format") != CACHE_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise _InvalidCache(f"format {meta.get('format')!r} version {meta.get('format_version')!r}")
    try:
        class_names = json.loads(meta["class_names"])
    except (KeyError, ValueError) as err:
        raise _InvalidCache("class names missing") from err
    size = image_size_of(meta)
    splits = {}
    for name in SPLITS:
        images, labels = arrays.get(f"{name}_images"), arrays.get(f"{name}_labels")
        if images is None or labels is None:
            raise _InvalidCache(f"{name} arrays missing")
        try:
            count = int(meta.get(f"{name}_count", -1))
        except ValueError as err:
            raise _InvalidCache(f"{name}_count is not a number") from err
        if tuple(images.shape) != (count, size, size, 3) or str(images.dtype) not in ("uint8", "torch.uint8"):
            raise _InvalidCache(f"{name} images have shape {tuple(images.shape)}, expected "
                                f"({count}, {size}, {size}, 3) uint8")
        if tuple(labels.shape) != (count,) or str(labels.dtype) not in ("int64", "torch.int64"):
            raise _InvalidCache(f"{name} labels have shape {tuple(labels.shape)}")
        labels = labels.clone() if framework == "pt" else np.array(labels)  # small: off the map
        if count and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise _InvalidCache(f"{name} labels out of range")
        splits[name] = Split(images, labels)
    if verify:
        _check_content(meta, arrays, path)
    return Dataset(splits["train"], splits["test"], list(class_names), dict(meta), pages)


def load_dataset(data_dir: Path, dataset: str = DEFAULT_DATASET) -> Dataset:
    """Load and verify a cache as torch uint8/int64 tensors, or raise an error that says how to get it."""
    path = cache_path(data_dir, dataset)
    try:
        return _read_cache(path, "pt")
    except _InvalidCache as err:
        how = f"cifarctl download --dataset {dataset}" if dataset != DEFAULT_DATASET else "cifarctl download"
        if dataset not in RELEASES:
            how += " --source PATH"
        fix = f"run `{how}`" if str(err) == "missing" else f"rebuild it with `{how}` (--source PATH for a local copy)"
        raise CifarctlError(f"no valid dataset cache at {path} ({err}); {fix}") from err


def ensure_dataset(cfg: DownloadConfig, reporter: Reporter) -> Dataset:
    """Load the verified cache, running the download step first when there is none. A damaged
    cache is an error that says how to rebuild it: a rebuild may need the network or a --source."""
    if not os.path.lexists(cache_path(cfg.data_dir, cfg.dataset)):
        if cfg.dataset not in RELEASES and cfg.source is None:
            raise CifarctlError(f"there is no dataset {cfg.dataset!r} in {cfg.data_dir}; import it with "
                                f"`cifarctl download --source DIR_OR_TAR --name {cfg.dataset}` (see `cifarctl datasets`)")
        download(cfg, reporter)
    return load_dataset(cfg.data_dir, cfg.dataset)


def dataset_stats(ds: Dataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images in [0, 1]: recorded at import, or computed
    for caches written before that was recorded."""
    try:
        mean, std = json.loads(ds.metadata["mean"]), json.loads(ds.metadata["std"])
        if len(mean) == len(std) == 3 and all(s > 0 for s in std):
            return [float(m) for m in mean], [float(s) for s in std]
    except (KeyError, ValueError, TypeError):
        pass
    return _channel_stats(ds.train.images, ds.release_pages)


def _channel_stats(images: Any, after_chunk: Callable[[], None] | None = None) -> tuple[list[float], list[float]]:
    """Mean and std per channel of (N, H, W, 3) uint8 (array, map or Spool), in [0, 1]; a chunk at a
    time, so float temporaries stay small. `after_chunk` hands a map's pages back as it goes, or the
    pass would leave the whole set resident (1.2 GB at 200,000 images)."""
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for part in chunks(images, 1024):  # 25 MB of float64 at a time for 32x32
        part = part.reshape(-1, 3).astype(np.float64)
        if after_chunk is not None:
            after_chunk()
        total += part.sum(0)
        squares += (part * part).sum(0)
        count += len(part)
    if not count:
        return [0.5] * 3, [0.5] * 3
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0))
    return [round(float(m / 255), 6) for m in mean], [round(float(max(s / 255, 1e-3)), 6) for s in std]


def list_datasets(data_dir: Path) -> list[dict[str, Any]]:
    """Every dataset cached in `data_dir`, from the headers alone (nothing is verified here): name,
    classes, counts, source, bytes on disk, and whether the header is readable."""
    out = []
    for path in sorted(Path(data_dir).glob(f"*{CACHE_SUFFIX}")):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            ds = _read_cache(path, "np", verify=False)
        except _InvalidCache as err:
            out.append({"name": path.stem, "status": f"invalid ({err})", "bytes": path.stat().st_size})
            continue
        meta = ds.metadata
        out.append({"name": meta.get("name") or path.stem, "status": "ok", "classes": len(ds.class_names),
                    "class_names": ds.class_names, "train": len(ds.train), "test": len(ds.test),
                    "source": meta.get("source", ""), "test_split": meta.get("test_split") or None,
                    "bytes": path.stat().st_size, "cache": str(path)})
    return out


def summarize(ds: Dataset) -> dict[str, Any]:
    """Image counts per split and class, as shown by `download` and printed by --json."""
    out: dict[str, Any] = {}
    for name in SPLITS:
        labels = np.asarray(ds.split(name).labels)
        counts = np.bincount(labels, minlength=len(ds.class_names)) if len(labels) else [0] * len(ds.class_names)
        out[name] = {"images": int(len(labels)), "per_class": dict(zip(ds.class_names, map(int, counts)))}
    return out


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _archive_name(url: str) -> str:
    """The file name a URL's archive is kept under: the last path segment, query left out."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    return name if name not in ("", ".", "..") and "/" not in name and "\\" not in name else "download.tar.gz"


def source_key(source: str) -> str:
    """A source as recorded in the cache: a URL as given, a local path absolute and resolved, so
    that the same file named two ways compares equal."""
    return source if _is_url(source) else str(Path(source).expanduser().resolve())


def _cached(cfg: DownloadConfig, cache: Path, reporter: Reporter, quiet: bool = False) -> dict[str, Any] | None:
    """The summary of a valid cache (every byte checked), or None when it must be built: missing,
    damaged, or built from another source than the one given explicitly."""
    try:
        ds = _read_cache(cache, "np", verify=True)
    except _InvalidCache as err:
        if os.path.lexists(cache) and not quiet:
            reporter.log(f"the cache at {cache} is invalid ({err}); rebuilding it")
        return None
    if cfg.image_size is not None and ds.train.images.shape[1] != cfg.image_size:
        if not quiet:
            reporter.log(f"the cache holds {ds.train.images.shape[1]}x{ds.train.images.shape[1]} images; rebuilding "
                         f"it at {cfg.image_size}x{cfg.image_size}")
        return None
    built_from = ds.metadata.get("source", "")
    if cfg.source is not None and built_from != source_key(cfg.source):
        if not quiet:
            reporter.log(f"the cache was built from {built_from or 'an unknown source'}; rebuilding it from "
                         f"{cfg.source} (the old cache stays until the new one is verified)")
        return None
    return _summary(ds, cache, status="cached")


def _clean_stale_extracts(data_dir: Path) -> None:
    """Remove .extract-PID folders and .spool-PID-* files that a killed import left behind."""
    for entry in [*data_dir.glob(".extract-*"), *data_dir.glob(".spool-*")]:
        pid = entry.name.removeprefix(".extract-").removeprefix(".spool-").split("-")[0]
        if pid.isdigit() and not fsutil.pid_alive(int(pid)) and not entry.is_symlink():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def _dir_lock(data_dir: Path, reporter: Reporter):
    """Hold an exclusive lock on the data dir, so that concurrent downloads (e.g. every rank of a
    torchrun job) do not write the same .part file; yields whether it had to wait."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks on folders
        yield False
        return
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            reporter.log(f"another cifarctl download is writing to {data_dir}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        yield waited
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def download(cfg: DownloadConfig, reporter: Reporter) -> dict[str, Any]:
    """Fetch or import CIFAR-10 once, verify it, and write the tensor cache. Returns a summary."""
    data_dir = Path(cfg.data_dir)
    cache = cache_path(data_dir, cfg.dataset)
    if cfg.dataset not in RELEASES and cfg.source is None:
        raise UsageError(f"{cfg.dataset!r} is not an official dataset ({', '.join(RELEASES)}); import an image "
                         f"folder as it with --source DIR_OR_TAR --name {cfg.dataset}")
    if cfg.image_size is not None and not MIN_IMAGE_SIZE <= cfg.image_size <= MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, not {cfg.image_size}")
    if cfg.image_size not in (None, SIZE) and cfg.source is None:  # refused before a 170 MB download
        raise UsageError(f"the official {cfg.dataset} release is {SIZE}x{SIZE}; --image-size is for image folders "
                         "(--source DIR_OR_TAR)")
    if cfg.source is not None and not _is_url(cfg.source) and not Path(cfg.source).expanduser().exists():
        raise UsageError(f"source {cfg.source} does not exist; pass an http(s) URL, a .tar.gz or a folder")
    if not cfg.force and (summary := _cached(cfg, cache, reporter)):
        return summary
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with _dir_lock(data_dir, reporter) as waited:
            if waited and not cfg.force and (summary := _cached(cfg, cache, reporter, quiet=True)):
                return summary
            _clean_stale_extracts(data_dir)
            return _build(cfg, data_dir, cache, reporter)
    except OSError as err:  # disk full, permissions, a file where a folder should be
        where = err.filename or data_dir
        raise CifarctlError(f"{where}: {err.strerror or err}; check --source, --data-dir and free disk space") from err


def _build(cfg: DownloadConfig, data_dir: Path, cache: Path, reporter: Reporter) -> dict[str, Any]:
    report = ImportReport()
    spools = Spools(data_dir)
    try:
        md5, parts, class_names = _import_source(cfg, data_dir, reporter, report, spools)
        if not MIN_CLASSES <= len(class_names) <= MAX_CLASSES:
            raise CifarctlError(f"{cfg.url_or_path} has {len(class_names)} classes; a dataset needs {MIN_CLASSES} "
                                f"to {MAX_CLASSES}")
        meta = _cache_meta(cfg.dataset, class_names, source_key(cfg.url_or_path), parts, source_md5=md5 or "")
        if report.test_split:
            meta.update(test_split=str(report.test_split), split_seed=str(cfg.split_seed))
        ds = _write_cache(cache, parts, meta)
    finally:
        spools.close()
    return _summary(ds, cache, status="built", converted=report.converted, skipped=report.skipped)


def _import_source(cfg: DownloadConfig, data_dir: Path, reporter: Reporter, report: ImportReport,
                   spools: Spools) -> tuple[str | None, dict[str, Spool], list[str]]:
    """(archive md5 or None, the four arrays as spools, class names) of the configured source."""
    source = cfg.url_or_path
    if _is_url(source):
        md5, release, archive = _fetch_archive(cfg, data_dir, reporter)
        return (md5, *_from_archive(archive, release, cfg, data_dir, reporter, report, spools))
    src = Path(source).expanduser()
    if src.is_dir():
        return (None, *import_folder(src, spools, reporter, report, size=cfg.image_size or SIZE,
                                     test_split=cfg.test_split,
                                     split_seed=cfg.split_seed))
    if src.is_file():
        md5, release = _verify_archive(src, cfg)
        return (md5, *_from_archive(src, release, cfg, data_dir, reporter, report, spools))
    raise UsageError(f"source {source} is neither a folder nor a file; pass an http(s) URL, a .tar.gz or a folder")


def _cache_meta(name: str, class_names: list[str], source: str, parts: dict[str, Any], **extra: str) -> dict[str, str]:
    """The metadata every cache carries: format, names, counts, image size, channel statistics."""
    mean, std = _channel_stats(parts["train_images"])
    return {
        "format": CACHE_FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "class_names": json.dumps(class_names),
        "source": source,
        "train_count": str(parts["train_labels"].shape[0]),
        "test_count": str(parts["test_labels"].shape[0]),
        "image_size": str(parts["train_images"].shape[1]),
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        **extra,
    }


def save_cache(data_dir: Path, name: str, arrays: dict[str, np.ndarray], class_names: list[str],
               source: str = "generated") -> Path:
    """Write arrays as dataset `name`'s cache, as an import would (for generated data: tests and
    benchmarks). arrays: train_images (N, S, S, 3) uint8, train_labels (N,) int64, test_*."""
    cache = cache_path(data_dir, name)
    spools = Spools(Path(data_dir))
    try:
        _write_cache(cache, arrays, _cache_meta(name, list(class_names), source, arrays), spools)
    finally:
        spools.close()
    return cache


def _fetch_archive(cfg: DownloadConfig, data_dir: Path, reporter: Reporter) -> tuple[str, Release | None, Path]:
    """The verified archive of a URL source: kept from an earlier run, or downloaded. Returns
    (md5, the official release it holds or None, path)."""
    url = cfg.url_or_path
    archive = data_dir / _archive_name(url)
    if archive.is_file():  # kept by an earlier run: rebuild from it without the network
        try:
            return (*_verify_archive(archive, cfg), archive)
        except CifarctlError as err:
            reporter.log(f"{archive.name} from an earlier run does not verify ({err}); downloading it again")
            archive.unlink()
    # An official archive's size is known: a server sending more is stopped at once.
    sizes = {r.url: r.size for r in RELEASES.values()}
    part = fetch(url, archive.with_name(archive.name + ".part"), reporter, max_bytes=sizes.get(url))
    try:
        md5, release = _verify_archive(part, cfg)
    except CifarctlError:
        part.unlink(missing_ok=True)  # a corrupt part would only be resumed into a corrupt file
        raise
    os.replace(part, archive)
    return md5, release, archive


def _summary(ds: Dataset, cache: Path, status: str, converted: int = 0, skipped: list | None = None) -> dict[str, Any]:
    return {
        "status": status,
        "dataset": ds.metadata.get("name") or cache.stem,
        "cache": str(cache),
        "source": ds.metadata.get("source", ""),
        "source_md5": ds.metadata.get("source_md5", ""),
        "class_names": ds.class_names,
        "splits": summarize(ds),
        "converted": converted,
        "skipped": skipped or [],
    }


def _write_cache(cache: Path, parts: dict[str, Any], meta: dict[str, str], spools: Spools | None = None) -> Dataset:
    """Write the cache atomically from spools (or arrays, spooled first); the new file is read back
    and verified before it replaces the old one, so a failed rebuild never costs a valid cache.
    Returns the verified dataset."""
    own = spools is None
    cache.parent.mkdir(parents=True, exist_ok=True)
    spools = spools or Spools(cache.parent)
    try:
        parts = {k: v if isinstance(v, Spool) else spools.of(k, np.asarray(v)) for k, v in parts.items()}
        meta = {**meta, "crc32": json.dumps({k: f"{v.crc:08x}" for k, v in sorted(parts.items())})}
        verified: list[Dataset] = []

        def check(tmp: Path) -> None:
            try:
                verified.append(_read_cache(tmp, "np", verify=True))
            except _InvalidCache as err:
                raise CifarctlError(f"the new cache for {cache} did not verify ({err}); the old one is kept") from err

        tensorfile.save_spools(cache, parts, meta, check=check)
    finally:
        if own:
            spools.close()
    return verified[0]


def _verify_archive(archive: Path, cfg: DownloadConfig) -> tuple[str, Release | None]:
    """Check an archive's md5 before anything in it is unpacked. Returns (md5, the official release
    whose layout it has, or None for an image-folder archive).

    The expected md5 is --md5 when given, else the official one for an archive from an official
    URL or in an official layout; an image-folder archive without --md5 is accepted and its md5
    recorded.
    """
    md5 = md5_file(archive)

    def check(expected: str) -> None:
        if md5 != expected.strip().lower():
            hint = "pass --md5 with the right checksum if this source is meant to differ from the official archive"
            raise CifarctlError(f"md5 mismatch for {archive.name}: expected {expected}, got {md5}; {hint}")

    # A known checksum is checked before the file is even read as a tar (it may be an error page).
    official_md5 = {r.url: r.md5 for r in RELEASES.values()}.get(cfg.url_or_path)
    expected = cfg.md5 or official_md5
    if expected:
        check(expected)
    release = release_of_archive(tar_names(archive), cfg.dataset)
    if release is not None and not expected:
        check(release.md5)
    return md5, release


def _from_archive(archive: Path, release: Release | None, cfg: DownloadConfig, data_dir: Path, reporter: Reporter,
                  report: ImportReport, spools: Spools) -> tuple[dict[str, Spool], list[str]]:
    tmp = data_dir / f".extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        reporter.log(f"unpacking {archive.name}")
        safe_extract(archive, tmp)
        if release is not None:
            if cfg.dataset in RELEASES and release.name != cfg.dataset:
                raise UsageError(f"{archive.name} is the {release.name} archive, not {cfg.dataset}; pass "
                                 f"--dataset {release.name}")
            marker = next(tmp.rglob(f"{release.folder}/{release.train_files[0]}"))
            if cfg.image_size not in (None, SIZE):
                raise UsageError(f"the {release.name} release is {SIZE}x{SIZE}; --image-size is for image folders")
            arrays, class_names = read_release(marker.parent, release)  # 60,000 images: small enough to hold
            return {k: spools.of(k, v) for k, v in arrays.items()}, class_names
        first = len(report.skipped)
        try:
            return import_folder(tmp, spools, reporter, report, size=cfg.image_size or SIZE, test_split=cfg.test_split,
                                 split_seed=cfg.split_seed)
        finally:
            for item in report.skipped[first:]:  # name files as they are in the archive, not the temp dir
                item["path"] = f"{archive.name}:{Path(item['path']).relative_to(tmp).as_posix()}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
