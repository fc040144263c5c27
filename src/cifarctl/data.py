"""CIFAR-10 on disk: download or import once, verify, and cache as uint8 tensors in one
safetensors file that every other command loads in well under a second."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import urllib.parse
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cifarctl import fsutil
from cifarctl.archive import load_pickle_batch, safe_extract, tar_names
from cifarctl.config import CIFAR10_BYTES, CIFAR10_MD5, CIFAR10_URL, DownloadConfig
from cifarctl.errors import CifarctlError, UsageError
from cifarctl.fetch import fetch, md5_file
from cifarctl.images import IMAGE_SUFFIXES, ImageError, load_image_counted, walk_files
from cifarctl.progress import Reporter

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ALIASES = {"plane": "airplane", "car": "automobile"}
SPLITS = ("train", "test")
CACHE_NAME = "cifar10.safetensors"
CACHE_FORMAT = "cifarctl-dataset"
FORMAT_VERSION = "1"
_OFFICIAL_DIR = "cifar-10-batches-py"
_CHUNK = 1000  # images per decode job: large enough to amortise process round trips


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

    def split(self, name: str) -> Split:
        """The split called `name` ("train" or "test")."""
        if name not in SPLITS:
            raise CifarctlError(f"unknown split {name!r}; use train or test")
        return getattr(self, name)


def cache_path(data_dir: Path) -> Path:
    """Where the tensor cache lives inside a data dir."""
    return Path(data_dir) / CACHE_NAME


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


def _digests(arrays: dict[str, Any]) -> dict[str, str]:
    """crc32 per array: catches flipped bits in the pixels, and reads CIFAR-10's 185 MB in about
    0.07 s here (md5 takes 0.28 s), cheap enough to check on every load."""
    return {name: f"{zlib.crc32(memoryview(_as_numpy(a)).cast('B')):08x}" for name, a in sorted(arrays.items())}


def _check_content(meta: dict[str, str], arrays: dict[str, Any]) -> None:
    """Raise _InvalidCache when the arrays do not match the digests recorded with them."""
    if meta.get("crc32"):
        try:
            expected = json.loads(meta["crc32"])
        except ValueError as err:
            raise _InvalidCache("its checksums are unreadable") from err
        if expected != _digests(arrays):
            raise _InvalidCache("its contents do not match their checksums")
    elif meta.get("content_md5") and _content_md5(arrays) != meta["content_md5"]:
        raise _InvalidCache("its contents do not match their checksum")


def _read_cache(path: Path, framework: str, verify: bool = True) -> Dataset:
    """Open and check a cache file; raises _InvalidCache naming what is wrong. `verify` also
    recomputes the content checksums, which reads every byte."""
    from safetensors import safe_open

    if not path.is_file():
        raise _InvalidCache("missing")
    try:
        with safe_open(str(path), framework=framework) as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for truncated or garbled files
        raise _InvalidCache(f"unreadable: {err}") from err
    if meta.get("format") != CACHE_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise _InvalidCache(f"format {meta.get('format')!r} version {meta.get('format_version')!r}")
    try:
        class_names = json.loads(meta["class_names"])
    except (KeyError, ValueError) as err:
        raise _InvalidCache("class names missing") from err
    splits = {}
    for name in SPLITS:
        images, labels = arrays.get(f"{name}_images"), arrays.get(f"{name}_labels")
        if images is None or labels is None:
            raise _InvalidCache(f"{name} arrays missing")
        try:
            count = int(meta.get(f"{name}_count", -1))
        except ValueError as err:
            raise _InvalidCache(f"{name}_count is not a number") from err
        if tuple(images.shape) != (count, 32, 32, 3) or str(images.dtype) not in ("uint8", "torch.uint8"):
            raise _InvalidCache(f"{name} images have shape {tuple(images.shape)}, expected ({count}, 32, 32, 3) uint8")
        if tuple(labels.shape) != (count,) or str(labels.dtype) not in ("int64", "torch.int64"):
            raise _InvalidCache(f"{name} labels have shape {tuple(labels.shape)}")
        if count and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise _InvalidCache(f"{name} labels out of range")
        splits[name] = Split(images, labels)
    if verify:
        _check_content(meta, arrays)
    return Dataset(splits["train"], splits["test"], list(class_names), dict(meta))


def load_dataset(data_dir: Path) -> Dataset:
    """Load and verify the cache as torch uint8/int64 tensors, or raise an error that says how to get it."""
    path = cache_path(data_dir)
    try:
        return _read_cache(path, "pt")
    except _InvalidCache as err:
        fix = "run `cifarctl download`" if str(err) == "missing" else \
            "rebuild it with `cifarctl download` (add --source PATH for a local copy)"
        raise CifarctlError(f"no valid dataset cache at {path} ({err}); {fix}") from err


def ensure_dataset(cfg: DownloadConfig, reporter: Reporter) -> Dataset:
    """Load the verified cache, running the download step first when there is none. A damaged
    cache is an error that says how to rebuild it: a rebuild may need the network or a --source."""
    if not os.path.lexists(cache_path(cfg.data_dir)):
        download(cfg, reporter)
    return load_dataset(cfg.data_dir)


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
    built_from = ds.metadata.get("source", "")
    if cfg.source is not None and built_from != source_key(cfg.source):
        if not quiet:
            reporter.log(f"the cache was built from {built_from or 'an unknown source'}; rebuilding it from "
                         f"{cfg.source} (the old cache stays until the new one is verified)")
        return None
    return _summary(ds, cache, status="cached")


def _clean_stale_extracts(data_dir: Path) -> None:
    """Remove .extract-PID folders that a killed import left behind."""
    for entry in data_dir.glob(".extract-*"):
        pid = entry.name.removeprefix(".extract-")
        if pid.isdigit() and not fsutil.pid_alive(int(pid)) and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


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
    cache = cache_path(data_dir)
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
    source = cfg.url_or_path
    if _is_url(source):
        md5, official, archive = _fetch_archive(cfg, data_dir, reporter)
        arrays, class_names = _from_archive(archive, official, data_dir, reporter, report)
    else:
        src = Path(source).expanduser()
        if src.is_dir():
            md5 = None
            arrays, class_names = _from_dir(src, reporter, report)
        elif src.is_file():
            md5, official = _verify_archive(src, cfg)
            arrays, class_names = _from_archive(src, official, data_dir, reporter, report)
        else:
            raise UsageError(f"source {source} is neither a folder nor a file; pass an http(s) URL, a .tar.gz "
                             "or a folder")
    meta = {
        "format": CACHE_FORMAT,
        "format_version": FORMAT_VERSION,
        "class_names": json.dumps(class_names),
        "source": source_key(source),
        "source_md5": md5 or "",
        "train_count": str(len(arrays["train_labels"])),
        "test_count": str(len(arrays["test_labels"])),
    }
    ds = _write_cache(cache, arrays, meta)
    return _summary(ds, cache, status="built", converted=report.converted, skipped=report.skipped)


def _fetch_archive(cfg: DownloadConfig, data_dir: Path, reporter: Reporter) -> tuple[str, bool, Path]:
    """The verified archive of a URL source: kept from an earlier run, or downloaded. Returns
    (md5, is_official_layout, path)."""
    url = cfg.url_or_path
    archive = data_dir / _archive_name(url)
    if archive.is_file():  # kept by an earlier run: rebuild from it without the network
        try:
            return (*_verify_archive(archive, cfg), archive)
        except CifarctlError as err:
            reporter.log(f"{archive.name} from an earlier run does not verify ({err}); downloading it again")
            archive.unlink()
    # The official archive's size is known: a server sending more is stopped at once.
    part = fetch(url, archive.with_name(archive.name + ".part"), reporter,
                 max_bytes=CIFAR10_BYTES if url == CIFAR10_URL else None)
    try:
        md5, official = _verify_archive(part, cfg)
    except CifarctlError:
        part.unlink(missing_ok=True)  # a corrupt part would only be resumed into a corrupt file
        raise
    os.replace(part, archive)
    return md5, official, archive


def _summary(ds: Dataset, cache: Path, status: str, converted: int = 0, skipped: list | None = None) -> dict[str, Any]:
    return {
        "status": status,
        "cache": str(cache),
        "source": ds.metadata.get("source", ""),
        "source_md5": ds.metadata.get("source_md5", ""),
        "class_names": ds.class_names,
        "splits": summarize(ds),
        "converted": converted,
        "skipped": skipped or [],
    }


def _write_cache(cache: Path, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> Dataset:
    """Write the cache atomically; the new file is read back and verified before it replaces the
    old one, so a failed rebuild never costs a valid cache. Returns the verified dataset."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = {**meta, "crc32": json.dumps(_digests(arrays))}
    with fsutil.atomic_path(cache) as tmp:
        save_file(arrays, str(tmp), metadata=meta)
        try:
            ds = _read_cache(tmp, "np", verify=True)
        except _InvalidCache as err:
            raise CifarctlError(f"the new cache for {cache} did not verify ({err}); the old one is kept") from err
    return ds


def _verify_archive(archive: Path, cfg: DownloadConfig) -> tuple[str, bool]:
    """Check an archive's md5 before anything in it is unpacked. Returns (md5, is_official_layout).

    The expected md5 is --md5 when given, else the official one for an archive in the official
    layout; an image-folder archive without --md5 is accepted and its md5 recorded.
    """
    md5 = md5_file(archive)

    def check(expected: str) -> None:
        if md5 != expected.strip().lower():
            hint = "pass --md5 with the right checksum if this source is meant to differ from the official archive"
            raise CifarctlError(f"md5 mismatch for {archive.name}: expected {expected}, got {md5}; {hint}")

    # A known checksum is checked before the file is even read as a tar (it may be an error page).
    expected = cfg.md5 or (CIFAR10_MD5 if cfg.url_or_path == CIFAR10_URL else None)
    if expected:
        check(expected)
    official = any(n.rstrip("/").endswith(f"{_OFFICIAL_DIR}/data_batch_1") for n in tar_names(archive))
    if official and not expected:
        check(CIFAR10_MD5)
    return md5, official


def _from_archive(archive: Path, official: bool, data_dir: Path, reporter: Reporter,
                  report: ImportReport) -> tuple[dict[str, np.ndarray], list[str]]:
    tmp = data_dir / f".extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        reporter.log(f"unpacking {archive.name}")
        safe_extract(archive, tmp)
        if official:
            batches = next(tmp.rglob(f"{_OFFICIAL_DIR}/data_batch_1")).parent
            return _from_official(batches)
        first = len(report.skipped)
        try:
            return _from_dir(tmp, reporter, report)
        finally:
            for item in report.skipped[first:]:  # name files as they are in the archive, not the temp dir
                item["path"] = f"{archive.name}:{Path(item['path']).relative_to(tmp).as_posix()}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_official(batches: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read the python-pickle release: 5 training batches, a test batch and batches.meta."""
    meta = load_pickle_batch(batches / "batches.meta")
    names = meta.get("label_names")
    class_names = [str(n) for n in names] if isinstance(names, list) else []
    if not class_names:
        raise CifarctlError("batches.meta has no label_names; the archive is not CIFAR-10")
    arrays = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        images, labels = [], []
        for name in names:
            path = batches / name
            if not path.is_file():
                raise CifarctlError(f"{name} is missing from the archive; re-download it")
            batch = load_pickle_batch(path)
            data, lab = batch.get("data"), batch.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise CifarctlError(f"{name}: 'data' is not a uint8 array of rows of 3072")
            if not isinstance(lab, list) or len(lab) != len(data):
                raise CifarctlError(f"{name}: 'labels' is not a list as long as 'data'")
            # Rows are channel-major (R plane, G plane, B plane); the cache is HWC.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            try:
                labels.append(np.asarray(lab, dtype=np.int64))
            except (TypeError, ValueError, OverflowError) as err:
                raise CifarctlError(f"{name}: 'labels' are not whole numbers ({err})") from err
        arrays[f"{split}_images"] = np.concatenate(images)
        arrays[f"{split}_labels"] = np.concatenate(labels)
        if arrays[f"{split}_labels"].size and not (0 <= arrays[f"{split}_labels"].min() and
                                                   arrays[f"{split}_labels"].max() < len(class_names)):
            raise CifarctlError(f"{split} labels fall outside the {len(class_names)} classes")
    return arrays, class_names


@dataclass
class ImportReport:
    """What an image-folder import changed or could not read."""

    converted: int = 0  # images that were not 32x32 RGB and were converted and resized
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "error"} per unreadable file


def _find_split_root(folder: Path) -> Path:
    """The folder holding train/ and test/: the given one, or its only subfolder (a tar's top dir)."""
    for _ in range(3):
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return folder
        subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) != 1:
            break
        folder = subdirs[0]
    raise CifarctlError(f"{folder} has no train/<class>/ and test/<class>/ folders; see `cifarctl download --help`")


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(split_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def class_order(names: list[str]) -> list[str]:
    """CIFAR-10's class order (with its canonical names) when the folders are CIFAR-10's classes,
    else the folder names sorted."""
    canonical = [ALIASES.get(n.lower(), n.lower()) for n in names]
    if sorted(canonical) == sorted(CLASSES):
        return list(CLASSES)
    return sorted(names)


def _from_dir(folder: Path, reporter: Reporter, report: ImportReport) -> tuple[dict[str, np.ndarray], list[str]]:
    root = _find_split_root(folder)
    class_names = class_order(list(_class_dirs(root / "train")))
    cifar = class_names == list(CLASSES)

    def label_of(folder_name: str) -> int | None:
        name = ALIASES.get(folder_name.lower(), folder_name.lower()) if cifar else folder_name
        return class_names.index(name) if name in class_names else None

    arrays = {}
    for split in SPLITS:
        dirs = _class_dirs(root / split)
        unknown = sorted(n for n in dirs if label_of(n) is None)
        if unknown:
            raise CifarctlError(f"{split}/ has classes that train/ lacks: {', '.join(unknown)}")
        files, labels = [], []
        for name, d in dirs.items():
            found, problems = walk_files(d, IMAGE_SUFFIXES)  # FIFOs, devices and link loops are reported
            report.skipped.extend({"path": p.path, "error": p.error} for p in problems)
            files += found
            labels += [label_of(name)] * len(found)
        if not files:
            raise CifarctlError(f"no images in {root / split}; expected {split}/<class>/ with "
                                f"{', '.join(IMAGE_SUFFIXES)} files")
        images, ok = _decode_all([str(f) for f in files], f"importing {split}", reporter, report)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)[ok]
        if not len(images):
            raise CifarctlError(f"none of the images in {root / split} could be read")
    return arrays, class_names


def _decode_chunk(paths: list[str]) -> tuple[np.ndarray, list[int], int, list[dict[str, str]]]:
    """Decode image files to (k, 32, 32, 3) uint8 with the pipeline `predict` uses; returns the
    images, the indices that worked, how many needed converting, and the failures."""
    out, ok, converted, failed = [], [], 0, []
    for i, path in enumerate(paths):
        try:
            image, was_converted = load_image_counted(path)
        except ImageError as err:
            failed.append({"path": path, "error": str(err)})
            continue
        out.append(image)
        ok.append(i)
        converted += was_converted
    images = np.stack(out) if out else np.zeros((0, 32, 32, 3), np.uint8)
    return images, ok, converted, failed


def _decode_all(paths: list[str], description: str, reporter: Reporter,
                report: ImportReport) -> tuple[np.ndarray, np.ndarray]:
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    workers = min(os.cpu_count() or 1, 8, len(chunks))
    images, ok = [], []
    with reporter.task(description, len(paths)) as task:
        if workers > 1:
            # spawn, not fork: the parent may hold threads (progress display) that fork would copy mid-lock.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                results = pool.map(_decode_chunk, chunks)
                for start, res in zip(range(0, len(paths), _CHUNK), results):
                    _collect(res, start, images, ok, report, task)
        else:
            for start, chunk in zip(range(0, len(paths), _CHUNK), chunks):
                _collect(_decode_chunk(chunk), start, images, ok, report, task)
    return np.concatenate(images), np.asarray(ok, dtype=np.int64)


def _collect(res, start, images, ok, report, task) -> None:
    imgs, idx, converted, failed = res
    images.append(imgs)
    ok.extend(start + i for i in idx)
    report.converted += converted
    report.skipped.extend(failed)
    task.advance(len(idx) + len(failed))
