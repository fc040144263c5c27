"""`cifarctl download`: fetch, verify, resume, cache, and import image folders (all on tiny data,
served from 127.0.0.1; never the real CIFAR-10 and never the network)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fakecifar as fc
from cifarctl import data
from cifarctl import fetch as fetch_mod
from cifarctl.cli import app
from cifarctl.config import DownloadConfig
from cifarctl.errors import CifarctlError
from cifarctl.progress import Reporter


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No proxies or cifarctl settings from the environment, and retries without real waits."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "CIFARCTL_SOURCE", "CIFARCTL_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data, "fetch", functools.partial(fetch_mod.fetch, backoff_s=0.01, timeout=5))


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> fc.OfficialArchive:
    """A tiny archive in the official layout (50 train and 20 test images)."""
    return fc.build_official_archive(tmp_path_factory.mktemp("official") / "cifar-10-python.tar.gz")


class LogReporter(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def cli(*args: str):
    return CliRunner().invoke(app, list(map(str, args)))


def assert_one_line_error(result, *needles: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def read_cache(data_dir: Path) -> data.Dataset:
    return data._read_cache(data.cache_path(data_dir), "np", verify=True)


def assert_matches(ds: data.Dataset, arc: fc.OfficialArchive) -> None:
    assert ds.class_names == list(fc.CLASSES)
    np.testing.assert_array_equal(ds.train.images, arc.train_images)
    np.testing.assert_array_equal(ds.train.labels, arc.train_labels)
    np.testing.assert_array_equal(ds.test.images, arc.test_images)
    np.testing.assert_array_equal(ds.test.labels, arc.test_labels)


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


# --- the official archive over HTTP ---------------------------------------------------------

def test_official_archive_is_downloaded_verified_and_cached(official, tmp_path):
    """download fetches the official-format archive, checks --md5 and caches its exact pixels (HWC) and labels."""
    with fc.FileServer(official.data) as server:
        result = cli("download", "--data-dir", tmp_path / "d", "--source", server.url, "--md5", official.md5)
    assert result.exit_code == 0, result.output
    assert "cached at" in result.stdout and "50" in result.stdout
    assert_matches(read_cache(tmp_path / "d"), official)
    assert not list((tmp_path / "d").glob("*.part"))


def test_json_prints_exactly_one_object(official, tmp_path):
    """--json prints one JSON object on stdout (built, then cached) and nothing else."""
    with fc.FileServer(official.data) as server:
        args = ("download", "--data-dir", tmp_path / "d", "--source", server.url, "--md5", official.md5, "--json")
        first, second = cli(*args), cli(*args)
    for result, status in ((first, "built"), (second, "cached")):
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)  # fails on anything but exactly one JSON document
        assert isinstance(summary, dict) and summary["status"] == status
        assert summary["source_md5"] == official.md5
        assert summary["class_names"] == list(fc.CLASSES)
        assert summary["splits"]["train"]["images"] == 50 and summary["splits"]["test"]["images"] == 20
        assert summary["splits"]["test"]["per_class"]["cat"] == 2
        assert summary["converted"] == 0 and summary["skipped"] == []


def test_md5_mismatch_caches_nothing(official, tmp_path):
    """A wrong md5 is a one-line error; no cache, no final-named archive and no .part are left."""
    with fc.FileServer(official.data) as server:
        result = cli("download", "--data-dir", tmp_path / "d", "--source", server.url, "--md5", "0" * 32)
    assert_one_line_error(result, "md5 mismatch")
    assert files_in(tmp_path / "d") == []


def test_official_md5_is_checked_without_md5_option(official, tmp_path):
    """An official-layout archive that is not the real one is refused unless --md5 names it."""
    with fc.FileServer(official.data) as server:
        result = cli("download", "--data-dir", tmp_path / "d", "--source", server.url)
    assert_one_line_error(result, "md5 mismatch", "--md5")
    assert files_in(tmp_path / "d") == []


def test_cut_connection_is_resumed_with_range(official, tmp_path):
    """A connection cut half-way is retried automatically with a Range request from the cut offset."""
    cut = len(official.data) // 2
    with fc.FileServer(official.data, cut_at=cut) as server:
        result = cli("download", "--data-dir", tmp_path / "d", "--source", server.url, "--md5", official.md5)
    assert result.exit_code == 0, result.output
    assert "download interrupted" in result.stdout
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0]
    assert server.requests[1]["Range"] == f"bytes={cut}-"
    assert_matches(read_cache(tmp_path / "d"), official)


def test_rerun_resumes_a_partial_download(official, tmp_path, monkeypatch):
    """A run that gives up keeps the .part file; the rerun asks only for the missing bytes."""
    cut = len(official.data) // 3
    cfg = DownloadConfig(data_dir=tmp_path / "d", md5=official.md5)
    with fc.FileServer(official.data, cut_at=cut) as server:
        cfg.source = server.url
        monkeypatch.setattr(data, "fetch", functools.partial(fetch_mod.fetch, retries=0))
        with pytest.raises(CifarctlError, match="rerun to resume"):
            data.download(cfg, Reporter())
        part = tmp_path / "d" / "cifar-10-python.tar.gz.part"
        assert part.stat().st_size == cut
        summary = data.download(cfg, Reporter())
    assert summary["status"] == "built"
    assert server.requests[1]["Range"] == f"bytes={cut}-"
    assert not part.exists()
    assert_matches(read_cache(tmp_path / "d"), official)


def test_server_without_range_support_starts_over(official, tmp_path):
    """A server that ignores Range sends the whole file again, and the download still succeeds."""
    cut = len(official.data) // 2
    with fc.FileServer(official.data, cut_at=cut, range_support=False) as server:
        summary = data.download(DownloadConfig(data_dir=tmp_path / "d", source=server.url, md5=official.md5),
                                Reporter())
    assert summary["status"] == "built" and summary["source_md5"] == official.md5
    assert server.requests[1]["Range"] == f"bytes={cut}-"  # asked, but got a 200 with the whole body
    assert_matches(read_cache(tmp_path / "d"), official)


def test_complete_part_is_not_fetched_again(official, tmp_path):
    """A .part that already holds the whole file (416 from the server) is verified, not re-downloaded."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "cifar-10-python.tar.gz.part").write_bytes(official.data)
    with fc.FileServer(official.data) as server:
        summary = data.download(DownloadConfig(data_dir=d, source=server.url, md5=official.md5), Reporter())
    assert summary["status"] == "built"
    assert len(server.requests) == 1 and server.requests[0]["Range"] == f"bytes={len(official.data)}-"


def test_second_download_does_not_touch_the_network(official, tmp_path):
    """A second download says "already downloaded and verified" without contacting the server."""
    with fc.FileServer(official.data) as server:
        first = cli("download", "--data-dir", tmp_path / "d", "--source", server.url, "--md5", official.md5)
        assert first.exit_code == 0, first.output
    assert len(server.requests) == 1
    second = cli("download", "--data-dir", tmp_path / "d", "--source", server.url, "--md5", official.md5)
    assert second.exit_code == 0, second.output
    assert "already downloaded and verified" in second.stdout
    assert len(server.requests) == 1


@pytest.mark.parametrize("damage", ["truncate", "garble_header", "flip_pixel", "wrong_version"])
def test_damaged_cache_is_detected_and_rebuilt(official, tmp_path, damage):
    """A truncated, garbled, bit-flipped or old-format cache is reported and rebuilt from the kept archive."""
    d = tmp_path / "d"
    cfg = DownloadConfig(data_dir=d, md5=official.md5)
    with fc.FileServer(official.data) as server:
        cfg.source = server.url
        data.download(cfg, Reporter())
    cache = data.cache_path(d)
    raw = bytearray(cache.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garble_header":
        raw[8:40] = b"\xff" * 32
    elif damage == "flip_pixel":
        raw[-100] ^= 0x01  # the last bytes are image data; the file still opens fine
    else:
        raw = raw.replace(b'"format_version":"1"', b'"format_version":"0"')
    cache.write_bytes(bytes(raw))
    reporter = LogReporter()
    summary = data.download(cfg, reporter)  # the server is gone: the kept archive must be enough
    assert summary["status"] == "built"
    assert any("invalid" in line for line in reporter.lines), reporter.lines
    assert_matches(read_cache(d), official)
    assert data.download(cfg, Reporter())["status"] == "cached"


def test_corrupt_kept_archive_is_downloaded_again(official, tmp_path):
    """A kept archive that no longer matches its md5 is fetched again rather than failing forever."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "cifar-10-python.tar.gz").write_bytes(official.data[:1000])
    with fc.FileServer(official.data) as server:
        summary = data.download(DownloadConfig(data_dir=d, source=server.url, md5=official.md5), Reporter())
    assert summary["status"] == "built" and len(server.requests) == 1
    assert_matches(read_cache(d), official)


def test_concurrent_downloads_fetch_once(official, tmp_path):
    """Two downloads into one data dir at once (e.g. torchrun ranks) fetch the archive once and both succeed."""
    results, barrier = [], threading.Barrier(2)

    def run(cfg):
        barrier.wait()
        results.append(data.download(cfg, Reporter()))

    with fc.FileServer(official.data, delay_s=0.3) as server:
        cfgs = [DownloadConfig(data_dir=tmp_path / "d", source=server.url, md5=official.md5) for _ in range(2)]
        threads = [threading.Thread(target=run, args=(c,)) for c in cfgs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert sorted(r["status"] for r in results) == ["built", "cached"]
    assert len(server.requests) == 1
    assert_matches(read_cache(tmp_path / "d"), official)


# --- failures without a usable server -------------------------------------------------------

def test_unresolvable_host_fails_fast_naming_source(tmp_path):
    """With no network (host does not resolve), download exits 1 at once with one line naming --source."""
    start = time.monotonic()
    result = cli("download", "--data-dir", tmp_path / "d", "--source", "http://nonexistent.invalid/x.tar.gz")
    assert time.monotonic() - start < 10
    assert_one_line_error(result, "--source")
    assert not data.cache_path(tmp_path / "d").exists()


def test_http_error_is_one_line(official, tmp_path):
    """A 404 from the server is a one-line error naming the status, without retries."""
    with fc.FileServer(official.data) as server:
        result = cli("download", "--data-dir", tmp_path / "d", "--source", server.url + ".missing")
    assert_one_line_error(result, "404")
    assert len(server.requests) == 1


def test_missing_local_source_is_one_line(tmp_path):
    """A --source path that does not exist is a one-line error, exit 2 (bad input)."""
    result = cli("download", "--data-dir", tmp_path / "d", "--source", tmp_path / "nope.tar.gz")
    assert_one_line_error(result, "does not exist", code=2)


# --- image-folder sources -------------------------------------------------------------------

CIFAR_FOLDERS = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cached_pairs(ds: data.Dataset, split: str) -> set[tuple[bytes, int]]:
    s = ds.split(split)
    return {(img.tobytes(), int(y)) for img, y in zip(s.images, s.labels)}


def test_image_folder_in_cifar_order_with_aliases(tmp_path):
    """A train/test folder of PNG/JPEG/BMP/WebP with CIFAR names (plane, car aliases) gets CIFAR-10's class order."""
    tree = fc.build_image_tree(tmp_path / "src", CIFAR_FOLDERS)
    summary = data.download(DownloadConfig(data_dir=tmp_path / "d", source=str(tree.root)), Reporter())
    assert summary["class_names"] == list(fc.CLASSES)
    assert summary["splits"]["train"]["images"] == 40 and summary["splits"]["test"]["images"] == 20
    assert summary["splits"]["train"]["per_class"] == dict.fromkeys(fc.CLASSES, 4)
    assert summary["converted"] == 0 and summary["skipped"] == []
    ds = read_cache(tmp_path / "d")
    for rel, img in tree.lossless.items():
        split, folder = rel.split("/")[:2]
        label = fc.CLASSES.index(data.ALIASES.get(folder, folder))
        assert (img.tobytes(), label) in cached_pairs(ds, split), rel


def test_image_folder_tar_gz_with_other_names_sorted(tmp_path):
    """A .tar.gz image folder with non-CIFAR classes is imported sorted; skipped files are named as in the tar."""
    tree = fc.build_image_tree(tmp_path / "src", ["zebra", "cat", "apple"], {"train": 3, "test": 1})
    (tree.root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    archive = fc.tar_directory(tree.root, tmp_path / "mine.tar.gz")
    result = cli("download", "--data-dir", tmp_path / "d", "--source", archive, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["class_names"] == ["apple", "cat", "zebra"]
    assert summary["splits"]["train"]["images"] == 9 and summary["splits"]["test"]["images"] == 3
    assert [s["path"] for s in summary["skipped"]] == ["mine.tar.gz:mydata/train/cat/broken.png"]
    ds = read_cache(tmp_path / "d")
    for rel, img in tree.lossless.items():
        split, folder = rel.split("/")[:2]
        assert (img.tobytes(), ["apple", "cat", "zebra"].index(folder)) in cached_pairs(ds, split), rel
    assert files_in(tmp_path / "d") == [data.CACHE_NAME]  # nothing unpacked is left behind


def test_odd_images_are_converted_and_unreadable_ones_skipped(tmp_path):
    """Non-32x32 or non-RGB images are converted and counted; unreadable files are listed in skipped."""
    tree = fc.build_image_tree(tmp_path / "src", ["a", "b"], {"train": 2, "test": 1})
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    small = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    train_a = tree.root / "train" / "a"
    (train_a / "big.png").write_bytes(fc.image_bytes(big, "PNG"))
    (train_a / "gray.png").write_bytes(fc.image_bytes(small, "PNG", mode="L"))
    (train_a / "palette.bmp").write_bytes(fc.image_bytes(small, "BMP", mode="P"))
    (train_a / "alpha.png").write_bytes(fc.image_bytes(small, "PNG", mode="RGBA"))
    (train_a / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (train_a / "cut.png").write_bytes(fc.image_bytes(small, "PNG")[:60])
    (train_a / "notes.txt").write_text("ignored: not an image suffix")
    result = cli("download", "--data-dir", tmp_path / "d", "--source", tree.root, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["converted"] == 4
    assert sorted(Path(s["path"]).name for s in summary["skipped"]) == ["cut.png", "garbage.jpg"]
    assert all(s["error"] for s in summary["skipped"])
    assert summary["splits"]["train"]["per_class"] == {"a": 6, "b": 2}
    ds = read_cache(tmp_path / "d")
    assert ds.train.images.shape == (8, 32, 32, 3) and ds.train.images.dtype == np.uint8
    plain = cli("download", "--data-dir", tmp_path / "d2", "--source", tree.root)
    assert "4 images were not 32x32 RGB" in plain.stdout and "skipped 2 unreadable" in plain.stdout


def test_split_without_images_is_an_error(tmp_path):
    """An image folder whose test split holds no images is a one-line error and caches nothing."""
    tree = fc.build_image_tree(tmp_path / "src", ["a", "b"], {"train": 2})
    (tree.root / "test" / "a").mkdir(parents=True)
    result = cli("download", "--data-dir", tmp_path / "d", "--source", tree.root)
    assert_one_line_error(result, "no images")
    assert not data.cache_path(tmp_path / "d").exists()


# --- the command line itself ----------------------------------------------------------------

def test_help_lists_commands_without_importing_torch():
    """`cifarctl --help` lists every command and does not import torch."""
    code = (
        "import sys\n"
        "sys.argv = ['cifarctl', '--help']\n"
        "from cifarctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    for command in ("download", "train", "evaluate", "predict", "show-batch"):
        assert command in proc.stdout
    assert proc.stdout.strip().endswith("NO-TORCH")


def test_version():
    """`cifarctl --version` prints the version."""
    from cifarctl import __version__

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"cifarctl {__version__}"
