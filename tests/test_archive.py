"""Untrusted archives: tar members that escape the target folder and pickles that run code."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

import fakecifar as fc
from cifarctl import data
from cifarctl.archive import load_pickle_batch, safe_extract
from cifarctl.cli import app
from cifarctl.errors import CifarctlError

HOSTILE = {
    "dotdot": lambda out: [("file", "mydata/train/a/ok.png", b"x"), ("file", "../evil", b"pwned")],
    "nested_dotdot": lambda out: [("file", "mydata/train/../../../evil", b"pwned")],
    "absolute": lambda out: [("file", "mydata/train/a/ok.png", b"x"), ("file", str(out / "abs_evil"), b"pwned")],
    "symlink": lambda out: [("symlink", "mydata/link", str(out)), ("file", "mydata/link/evil", b"pwned")],
    "symlink_file": lambda out: [("symlink", "mydata/passwd", "/etc/passwd")],
    "hardlink": lambda out: [("file", "mydata/a", b"x"), ("hardlink", "mydata/evil", str(out / "target"))],
}


def tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in ("CIFARCTL_SOURCE", "CIFARCTL_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_safe_extract_refuses_escaping_members(tmp_path, kind):
    """A tar with '..', an absolute path, a symlink or a hard link is refused before anything is written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("keep")
    archive = fc.build_tar(tmp_path / "evil.tar.gz", HOSTILE[kind](outside))
    dest = tmp_path / "work" / "dest"
    with pytest.raises(CifarctlError, match="refusing evil.tar.gz"):
        safe_extract(archive, dest)
    assert tree(tmp_path / "work") == []
    assert tree(outside) == ["target"] and (outside / "target").read_text() == "keep"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "work" / "evil").exists()


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_download_refuses_escaping_archive(tmp_path, kind):
    """`download --source evil.tar.gz` exits 1 with one line and writes nothing inside or outside the data dir."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("keep")
    archive = fc.build_tar(tmp_path / "evil.tar.gz", HOSTILE[kind](outside))
    data_dir = tmp_path / "d"
    result = CliRunner().invoke(app, ["download", "--data-dir", str(data_dir), "--source", str(archive)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing" in lines[0] and "Traceback" not in result.output
    assert tree(data_dir) == []
    assert tree(outside) == ["target"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "evil.tar.gz", "outside"]


def test_safe_extract_writes_ordinary_members(tmp_path):
    """An ordinary tar is unpacked in full inside the target folder."""
    archive = fc.build_tar(tmp_path / "ok.tar", [("dir", "top"), ("file", "top/a/b.txt", b"hello"),
                                                 ("file", "./top/c.txt", b"c")], compress=False)
    written = safe_extract(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "top" / "a" / "b.txt").read_bytes() == b"hello"
    assert len(written) == 2 and tree(tmp_path / "dest") == ["top", "top/a", "top/a/b.txt", "top/c.txt"]


def test_not_a_tar_is_a_clear_error(tmp_path):
    """A file that is not a tar archive gives an error naming it, not a traceback."""
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CifarctlError, match="not a readable tar archive"):
        safe_extract(bogus, tmp_path / "dest")


def test_official_style_batch_is_read(tmp_path):
    """A Python-2 style batch (latin1 strings, channel-major uint8 rows) loads with the restricted unpickler."""
    arc = fc.build_official_archive(tmp_path / "a.tar.gz")
    with tarfile.open(arc.path) as tar:
        raw = tar.extractfile(f"{fc.OFFICIAL_DIR}/data_batch_2").read()
        meta = tar.extractfile(f"{fc.OFFICIAL_DIR}/batches.meta").read()
    reference = pickle.loads(raw, encoding="latin1")
    assert set(reference) == {"data", "labels", "filenames", "batch_label"}
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # like the real files: Python 2 byte strings need encoding="latin1"
    (tmp_path / "data_batch_2").write_bytes(raw)
    batch = load_pickle_batch(tmp_path / "data_batch_2")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (10, 3072)
    np.testing.assert_array_equal(batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), arc.train_images[10:20])
    assert batch["labels"] == list(arc.train_labels[10:20]) and batch["batch_label"] == "training batch 2 of 5"
    (tmp_path / "batches.meta").write_bytes(meta)
    assert load_pickle_batch(tmp_path / "batches.meta")["label_names"] == list(fc.CLASSES)


@pytest.mark.parametrize("payload", [fc.SystemTouch, fc.OpenForWrite])
def test_hostile_pickle_is_refused(tmp_path, payload):
    """A batch whose unpickling would run os.system or open() is refused and the file never appears."""
    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_1").write_bytes(fc.hostile_batch(payload(marker)))
    with pytest.raises(CifarctlError, match="data_batch_1: refusing to unpickle"):
        load_pickle_batch(tmp_path / "data_batch_1")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [fc.SystemTouch, fc.OpenForWrite])
def test_download_refuses_hostile_pickle(tmp_path, payload):
    """`download` of an archive with a code-running batch pickle exits 1 with one line; nothing is run or cached."""
    marker = tmp_path / "pwned"
    arc = fc.build_official_archive(tmp_path / "cifar.tar.gz",
                                    replace={"data_batch_3": fc.hostile_batch(payload(marker))})
    result = CliRunner().invoke(app, ["download", "--data-dir", str(tmp_path / "d"), "--source", str(arc.path),
                                      "--md5", arc.md5])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to unpickle" in lines[0] and "data_batch_3" in lines[0]
    assert not marker.exists()
    assert tree(tmp_path / "d") == []
    assert not data.cache_path(tmp_path / "d").exists()
