"""The dataset cache is trusted only when verified: commands notice damage and say how to rebuild;
`--force` and `--source` never lose a valid cache before its replacement is verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifarctl import data
from cifarctl.config import DownloadConfig
from cifarctl.errors import CifarctlError
from cifarctl.progress import Reporter
from conftest import write_tiny_cache
from fakecifar import build_image_tree
from modelfiles import brightness_weights


def cli(*args: object):
    return CliRunner().invoke(app_(), [str(a) for a in args])


def app_():
    from cifarctl.cli import app

    return app


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """No cifarctl settings from the environment."""
    for var in ("CIFARCTL_DATA_DIR", "CIFARCTL_SOURCE"):
        monkeypatch.delenv(var, raising=False)


def flip_a_pixel(data_dir: Path) -> None:
    """Flip one bit in the image data: the file still opens, only a checksum can tell."""
    cache = data.cache_path(data_dir)
    raw = bytearray(cache.read_bytes())
    raw[-100] ^= 0x01
    cache.write_bytes(bytes(raw))


@pytest.mark.parametrize("command", [["train", "--epochs", "1"], ["evaluate", "WEIGHTS"],
                                     ["show-batch", "--no-preview", "--out", "OUT"]])
def test_commands_notice_a_damaged_cache_and_say_how_to_rebuild(tmp_path: Path, command: list[str]) -> None:
    """train, evaluate and show-batch refuse a bit-flipped cache with one line naming `cifarctl download`."""
    data_dir = write_tiny_cache(tmp_path / "data")
    flip_a_pixel(data_dir)
    weights = brightness_weights(tmp_path / "w" / "weights.safetensors")
    args = [str(weights) if a == "WEIGHTS" else str(tmp_path / "g.png") if a == "OUT" else a for a in command]
    if command[0] == "train":
        args += ["-o", str(tmp_path / "run")]
    result = cli(*args, "--data-dir", data_dir)
    assert result.exit_code == 1, result.output
    assert "do not match their checksums" in result.output and "cifarctl download" in result.output
    assert "Traceback" not in result.output


def test_old_caches_with_an_md5_still_verify(tmp_path: Path) -> None:
    """A cache written before per-array crc32 digests (content_md5 only) still loads and is still checked."""
    from safetensors.numpy import save_file

    data_dir = write_tiny_cache(tmp_path / "data")
    ds = data._read_cache(data.cache_path(data_dir), "np")
    arrays = {f"{s}_{k}": getattr(getattr(ds, s), k) for s in ("train", "test") for k in ("images", "labels")}
    meta = {k: v for k, v in ds.metadata.items() if k != "crc32"}
    meta["content_md5"] = data._content_md5(arrays)
    save_file(arrays, str(data.cache_path(data_dir)), metadata=meta)
    assert len(data.load_dataset(data_dir).train) == 200
    flip_a_pixel(data_dir)
    with pytest.raises(CifarctlError, match="checksum"):
        data.load_dataset(data_dir)


def test_force_keeps_the_valid_cache_when_the_rebuild_fails(tmp_path: Path) -> None:
    """download --force from a source that fails verification leaves the old cache byte for byte."""
    data_dir = write_tiny_cache(tmp_path / "data")
    before = data.cache_path(data_dir).read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"this is not a tar archive")
    result = cli("download", "--data-dir", data_dir, "--source", bad, "--force")
    assert result.exit_code != 0
    assert data.cache_path(data_dir).read_bytes() == before


def test_cache_from_another_source_is_rebuilt_from_the_given_one(tmp_path: Path) -> None:
    """download --source X over a cache built from Y rebuilds it from X; the same X again is 'already downloaded'."""
    data_dir = write_tiny_cache(tmp_path / "data")
    tree = build_image_tree(tmp_path / "pets", ["cat", "dog", "fish"])
    result = cli("download", "--data-dir", data_dir, "--source", tree.root, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "built" and summary["class_names"] == ["cat", "dog", "fish"]
    again = json.loads(cli("download", "--data-dir", data_dir, "--source", tree.root, "--json").stdout)
    assert again["status"] == "cached"
    plain = json.loads(cli("download", "--data-dir", data_dir, "--json").stdout)  # no --source: keep what is there
    assert plain["status"] == "cached" and plain["class_names"] == ["cat", "dog", "fish"]


@pytest.mark.parametrize("source", ["missing-folder", "missing.tar.gz"])
def test_a_source_that_does_not_exist_is_an_error_even_with_a_cache(tmp_path: Path, source: str) -> None:
    """--source naming nothing is exit 2, never 'already downloaded'."""
    data_dir = write_tiny_cache(tmp_path / "data")
    result = cli("download", "--data-dir", data_dir, "--source", tmp_path / source)
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.output and "already" not in result.output


def test_missing_cache_is_downloaded_but_a_damaged_one_is_not_silently_replaced(tmp_path: Path) -> None:
    """ensure_dataset builds a missing cache from the configured source, and refuses a damaged one."""
    tree = build_image_tree(tmp_path / "pets", ["cat", "dog"])
    cfg = DownloadConfig(data_dir=tmp_path / "data", source=str(tree.root))
    assert data.ensure_dataset(cfg, Reporter()).class_names == ["cat", "dog"]
    flip_a_pixel(cfg.data_dir)
    with pytest.raises(CifarctlError, match="rebuild it with `cifarctl download`"):
        data.ensure_dataset(cfg, Reporter())
