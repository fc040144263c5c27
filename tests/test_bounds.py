"""Bounded resources: hostile archives cannot fill the disk or memory, and misbehaving servers
cannot make a download hang or grow without limit (loopback servers only, small data)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fakecifar as fc
from cifarctl import archive as archive_mod
from cifarctl.archive import load_pickle_batch, max_import_bytes, safe_extract, tar_names
from cifarctl.cli import app
from cifarctl.errors import CifarctlError, UsageError
from cifarctl.fetch import fetch
from cifarctl.progress import Reporter

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """No proxies or cifarctl limits from the environment."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                "NO_PROXY", "CIFARCTL_SOURCE", "CIFARCTL_DATA_DIR", "CIFARCTL_MAX_IMPORT_BYTES",
                "CIFARCTL_MAX_DOWNLOAD_BYTES", "CIFARCTL_DOWNLOAD_TIMEOUT", "CIFARCTL_DOWNLOAD_IDLE_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


# --- archives ---------------------------------------------------------------------------------

def test_sparse_member_is_refused(tmp_path):
    """A tar with a sparse member is refused before anything is written."""
    archive = fc.sparse_tar(tmp_path / "sparse.tar.gz")
    with pytest.raises(CifarctlError, match="refusing sparse.tar.gz: member .*sparse.png' is a sparse file"):
        safe_extract(archive, tmp_path / "dest")
    assert files_in(tmp_path / "dest") == []


def test_absurd_declared_size_is_refused_from_the_header(tmp_path):
    """A member whose header declares 1 TiB is refused at once by the default limit, when listing and unpacking."""
    archive = fc.lying_size_tar(tmp_path / "huge.tar.gz", "mydata/train/a/x.png", 1 << 40)
    start = time.monotonic()
    for call in (lambda: tar_names(archive), lambda: safe_extract(archive, tmp_path / "dest")):
        with pytest.raises(CifarctlError, match=r"declares 1,099,511,627,776 bytes.*CIFARCTL_MAX_IMPORT_BYTES"):
            call()
    assert time.monotonic() - start < 1
    assert files_in(tmp_path / "dest") == []


def test_gzip_bomb_member_stops_before_writing(tmp_path):
    """A 5 KiB .tar.gz holding 5 MiB of zeros is refused under a 1 MiB limit; nothing is written."""
    archive = fc.zeros_tar(tmp_path / "bomb.tar.gz", {"mydata/train/a/zeros.png": 5 * MiB})
    assert archive.stat().st_size < 64 * 1024
    needle = r"bomb.tar.gz.*1,048,576-byte unpacking limit.*CIFARCTL_MAX_IMPORT_BYTES"
    for call in (lambda: tar_names(archive, max_bytes=MiB),
                 lambda: safe_extract(archive, tmp_path / "d", max_bytes=MiB)):
        with pytest.raises(CifarctlError, match=needle):
            call()
    assert files_in(tmp_path / "d") == []


def test_many_members_summing_past_the_limit_are_refused(tmp_path):
    """Members each under the limit but together over it are refused before any is written."""
    archive = fc.zeros_tar(tmp_path / "many.tar.gz", {f"mydata/train/a/{i}.png": 300 * 1024 for i in range(8)})
    with pytest.raises(CifarctlError, match="1,048,576-byte unpacking limit"):
        safe_extract(archive, tmp_path / "d", max_bytes=MiB)
    assert files_in(tmp_path / "d") == []
    assert len(safe_extract(archive, tmp_path / "ok", max_bytes=4 * MiB)) == 8  # under a larger limit it unpacks


def test_member_count_is_capped(tmp_path):
    """A tar of more empty files than the member cap is refused before any inode is used."""
    archive = fc.build_tar(tmp_path / "inodes.tar.gz", [("file", f"mydata/{i}", b"") for i in range(30)])
    with pytest.raises(CifarctlError, match="more than 10 members"):
        safe_extract(archive, tmp_path / "d", max_members=10)
    assert files_in(tmp_path / "d") == []


def test_huge_tar_header_is_refused_without_reading_it(tmp_path):
    """A pax header claiming 17 MiB of metadata (an 18 KiB file) is refused instead of read into memory."""
    archive = fc.pax_header_tar(tmp_path / "pax.tar.gz", 17 * MiB)
    with pytest.raises(CifarctlError, match="a tar header claims"):
        tar_names(archive)


def test_disk_full_half_way_leaves_no_partial_file(tmp_path):
    """A write that fails half-way through a member (here a 1 MiB file-size limit) deletes that file."""
    pytest.importorskip("resource")  # RLIMIT_FSIZE: POSIX only
    archive = fc.zeros_tar(tmp_path / "big.tar.gz", {"mydata/small": 1000, "mydata/big": 3 * MiB})
    code = ("import resource, signal, sys\n"
            "from pathlib import Path\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "from cifarctl.archive import safe_extract\n"
            "safe_extract(Path(sys.argv[1]), Path(sys.argv[2]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(archive), str(tmp_path / "d")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "cannot write" in proc.stderr and "File too large" in proc.stderr, proc.stderr
    assert files_in(tmp_path / "d") == ["mydata", "mydata/small"]


def test_download_of_a_bomb_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    """`download --source bomb.tar.gz` over CIFARCTL_MAX_IMPORT_BYTES exits 1 with one line naming the variable."""
    archive = fc.zeros_tar(tmp_path / "bomb.tar.gz", {"mydata/train/a/x.png": 3 * MiB})
    monkeypatch.setenv("CIFARCTL_MAX_IMPORT_BYTES", str(MiB))
    result = CliRunner().invoke(app, ["download", "--data-dir", str(tmp_path / "d"), "--source", str(archive)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CIFARCTL_MAX_IMPORT_BYTES" in lines[0] and "bomb.tar.gz" in lines[0], lines
    assert files_in(tmp_path / "d") == []


@pytest.mark.parametrize("value", ["lots", "-5", "0", "1.5"])
def test_bad_import_limit_is_a_usage_error(monkeypatch, value):
    """A CIFARCTL_MAX_IMPORT_BYTES that is not a positive whole number is a one-line usage error naming it."""
    monkeypatch.setenv("CIFARCTL_MAX_IMPORT_BYTES", value)
    with pytest.raises(UsageError, match="CIFARCTL_MAX_IMPORT_BYTES"):
        max_import_bytes()


def test_import_limit_comes_from_the_environment(monkeypatch):
    """CIFARCTL_MAX_IMPORT_BYTES sets the limit; unset, it is DEFAULT_MAX_IMPORT_BYTES."""
    assert max_import_bytes() == archive_mod.DEFAULT_MAX_IMPORT_BYTES
    monkeypatch.setenv("CIFARCTL_MAX_IMPORT_BYTES", "12345")
    assert max_import_bytes() == 12345


def test_oversized_batch_file_is_refused(tmp_path):
    """A batch file larger than a CIFAR-10 batch can be is refused without being unpickled."""
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x02" + bytes(300))
    with pytest.raises(CifarctlError, match="data_batch_1 is larger than 200 bytes.*not genuine CIFAR-10"):
        load_pickle_batch(tmp_path / "data_batch_1", max_bytes=200)
    assert archive_mod.MAX_BATCH_BYTES >= 40_000_000  # the official batches (about 31 MB) still load


# --- downloads --------------------------------------------------------------------------------

def bounded_fetch(url: str, part: Path, limit_s: float = 10.0, **kwargs) -> tuple[Exception | None, float]:
    """Run fetch in a thread and fail the test (rather than hang it) if it outlives `limit_s`."""
    outcome: list = []
    start = time.monotonic()

    def run() -> None:
        try:
            fetch(url, part, Reporter(), backoff_s=0.01, **kwargs)
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - handed to the test
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"fetch still running after {limit_s} s"
    return outcome[0], time.monotonic() - start


def test_endless_body_stops_at_the_limit(tmp_path, monkeypatch):
    """A server streaming forever without Content-Length is cut at CIFARCTL_MAX_DOWNLOAD_BYTES; no .part is left."""
    monkeypatch.setenv("CIFARCTL_MAX_DOWNLOAD_BYTES", str(256 * 1024))
    part = tmp_path / "file.tar.gz.part"
    with fc.RawServer(fc.endless_body) as server:
        err, elapsed = bounded_fetch(server.url, part)
    assert isinstance(err, CifarctlError)
    assert "more than the 262,144-byte limit" in str(err) and "CIFARCTL_MAX_DOWNLOAD_BYTES" in str(err)
    assert "\n" not in str(err) and server.requests == 1  # refused, not retried
    assert not part.exists() and elapsed < 5


def test_announced_size_over_the_limit_is_refused_before_the_body(tmp_path):
    """A Content-Length above max_bytes is refused from the headers; nothing is written."""
    part = tmp_path / "file.tar.gz.part"
    with fc.RawServer(fc.announces(10 << 30, 64 * 1024)) as server:
        err, _ = bounded_fetch(server.url, part, max_bytes=MiB)
    assert isinstance(err, CifarctlError) and "announces 10,737,418,240 bytes" in str(err), err
    assert "1,048,576-byte limit" in str(err) and not part.exists()


def test_body_longer_than_content_length_is_not_read_past_it(tmp_path):
    """A server sending 4 MiB after announcing 1,000 bytes yields exactly the 1,000 announced bytes, at once."""
    part = tmp_path / "file.tar.gz.part"
    with fc.RawServer(fc.announces(1000, 4 * MiB)) as server:
        err, elapsed = bounded_fetch(server.url, part)
    assert err is None and part.stat().st_size == 1000 and elapsed < 5


def test_chunked_body_beyond_content_length_is_stopped(tmp_path):
    """A chunked body that runs past the Content-Length it announced is stopped there; no .part is left."""
    part = tmp_path / "file.tar.gz.part"
    with fc.RawServer(fc.chunked_beyond(1000)) as server:
        err, elapsed = bounded_fetch(server.url, part)
    assert isinstance(err, CifarctlError) and "sent more than the 1,000 bytes it announced" in str(err), err
    assert not part.exists() and elapsed < 5


def test_trickling_body_fails_at_the_total_deadline(tmp_path):
    """A trickling server fails at the whole-download deadline, retries included, naming the bytes that arrived."""
    part = tmp_path / "file.tar.gz.part"
    with fc.RawServer(fc.trickle(0.05)) as server:
        err, elapsed = bounded_fetch(server.url, part, idle_timeout_s=0.4, total_timeout_s=1.0)
    assert isinstance(err, CifarctlError) and "did not finish within 1 s" in str(err), err
    got = part.stat().st_size
    assert got < 1024 and f"({got:,} bytes arrived)" in str(err)  # the .part is kept: a rerun resumes
    assert "CIFARCTL_DOWNLOAD_TIMEOUT" in str(err) and "\n" not in str(err)
    assert 0.9 < elapsed < 3 and server.requests >= 2  # the stall was retried until the deadline


@pytest.mark.parametrize("responder", [fc.silent, fc.trickle(0.05)], ids=["silent", "trickle"])
def test_stalls_are_retried_a_limited_number_of_times(tmp_path, responder):
    """With no total deadline, a silent or trickling server fails after `retries` stalls, naming the idle setting."""
    part = tmp_path / "file.tar.gz.part"
    with fc.RawServer(responder) as server:
        err, elapsed = bounded_fetch(server.url, part, retries=2, idle_timeout_s=0.2, total_timeout_s=float("inf"))
    assert isinstance(err, CifarctlError) and "failed after 3 tries (stalled" in str(err), err
    assert "CIFARCTL_DOWNLOAD_IDLE_TIMEOUT" in str(err) and "bytes" in str(err)
    assert server.requests == 3 and elapsed < 4


def test_trickling_headers_fail_at_the_total_deadline(tmp_path):
    """A server that never finishes its headers (one byte at a time) is cut off at the deadline."""
    with fc.RawServer(fc.trickle(0.05, headers=True)) as server:
        err, elapsed = bounded_fetch(server.url, tmp_path / "file.part", idle_timeout_s=5, total_timeout_s=0.5)
    assert isinstance(err, CifarctlError) and "did not finish within 0.5 s" in str(err), err
    assert elapsed < 3


@pytest.mark.parametrize("var", ["CIFARCTL_DOWNLOAD_TIMEOUT", "CIFARCTL_DOWNLOAD_IDLE_TIMEOUT",
                                 "CIFARCTL_MAX_DOWNLOAD_BYTES"])
def test_bad_download_setting_is_a_usage_error(tmp_path, monkeypatch, var):
    """A download limit variable that is not a positive number is a usage error naming it, before any request."""
    monkeypatch.setenv(var, "soon")
    with pytest.raises(UsageError, match=var):
        fetch("http://127.0.0.1:9/x", tmp_path / "x.part", Reporter())
