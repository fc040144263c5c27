"""Run directories: resume through runs/latest and other symlinks, never overwriting a run unasked,
one process per run, `latest` only ever our symlink, and one-line errors for unusable -o paths."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifarctl import rundir
from cifarctl.cli import app
from cifarctl.errors import UsageError
from cifarctl.rundir import RunDir

FAST = ["--epochs", "1", "--seed", "0", "--log-every", "100000"]


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, code: int, *needles: str) -> None:
    """The command failed with `code`, one line, no traceback, naming each needle."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.fixture
def runs(tmp_path: Path, monkeypatch) -> Path:
    """Work in a fresh folder, so runs/ and runs/latest are the test's own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs"


def test_resume_through_latest_resolves_to_the_real_run(tiny_data_dir: Path, runs: Path) -> None:
    """`--resume runs/latest` continues the real run, and latest still points at it afterwards."""
    assert cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", runs / "a").exit_code == 0
    result = cli("train", "--resume", runs / "latest", "--epochs", "2", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert Path(summary["run_dir"]) == (runs / "a").resolve() and summary["epochs"] == 2
    assert (runs / "latest").is_symlink() and (runs / "latest").resolve() == (runs / "a").resolve()
    assert cli("evaluate", "--data-dir", tiny_data_dir).exit_code == 0  # the default path still works


def test_resume_through_any_symlink_and_a_checkpoint_path(tiny_data_dir: Path, runs: Path, tmp_path: Path) -> None:
    """A symlink to a run, or the run's checkpoint file, resumes the real folder."""
    assert cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", runs / "a").exit_code == 0
    (tmp_path / "mylink").symlink_to(runs / "a")
    assert cli("train", "--resume", tmp_path / "mylink", "--epochs", "2").exit_code == 0
    assert not (tmp_path / "mylink").resolve() == tmp_path / "mylink"
    assert cli("train", "--resume", runs / "a" / "checkpoint.safetensors", "--epochs", "3").exit_code == 0
    assert json.loads((runs / "a" / "config.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("what", ["missing", "empty folder", "file"])
def test_resume_of_something_that_is_no_run_is_one_line(runs: Path, tmp_path: Path, what: str) -> None:
    """--resume of a missing path, an empty folder or a file is one line and exit 2."""
    target = tmp_path / "x"
    if what == "empty folder":
        target.mkdir()
    elif what == "file":
        target.write_text("hello")
    one_line(cli("train", "--resume", target), 2, "cannot resume")


def test_existing_run_is_never_overwritten_without_being_asked(tiny_data_dir: Path, runs: Path) -> None:
    """-o naming a folder that holds a run exits 2 naming --resume; the run's files are untouched; --overwrite replaces it."""
    assert cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", runs / "a").exit_code == 0
    before = {p.name: p.read_bytes() for p in (runs / "a").iterdir()}
    one_line(cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", runs / "a"), 2, "--resume", "already holds a run")
    assert {p.name: p.read_bytes() for p in (runs / "a").iterdir()} == before
    result = cli("train", "--data-dir", tiny_data_dir, *FAST, "--seed", "5", "-o", runs / "a", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((runs / "a" / "config.json").read_text())["seed"] == 5


def test_a_second_process_on_the_same_run_is_refused_at_once(tiny_data_dir: Path, runs: Path) -> None:
    """While one process holds a run directory, a second train into it exits with the holder's pid."""
    run = rundir.create(runs / "busy")
    with rundir.locked(run):
        assert (run.root / rundir.LOCK).read_text().strip() == str(os.getpid())
        result = cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", run.root)
        one_line(result, 1, f"pid {os.getpid()}")
        with pytest.raises(rundir.RunLocked):
            with rundir.locked(RunDir(run.root)):
                pass
    assert not (run.root / rundir.LOCK).exists()  # released and removed at the end
    assert cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", run.root).exit_code == 0


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_user_file_called_latest_is_never_touched(tiny_data_dir: Path, runs: Path, kind: str) -> None:
    """A regular file or folder of the user's named runs/latest is left as it is, with a warning."""
    latest = runs / "latest"
    if kind == "file":
        runs.mkdir()
        latest.write_text("my notes")
    else:
        latest.mkdir(parents=True)
        (latest / "keep.txt").write_text("mine")
    result = cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", runs / "a")
    assert result.exit_code == 0, result.output
    assert "not a symlink made by cifarctl" in result.output
    assert not latest.is_symlink()
    assert (latest.read_text() if kind == "file" else (latest / "keep.txt").read_text()) in ("my notes", "mine")


def test_latest_moves_only_once_a_run_has_weights(tiny_data_dir: Path, runs: Path, monkeypatch) -> None:
    """A run that fails before its first weights leaves runs/latest pointing at the previous good run."""
    assert cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", runs / "good").exit_code == 0
    result = cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", runs / "bad", "--lr", "1e3")
    assert result.exit_code == 1 and "NaN" in result.output, result.output
    assert (runs / "latest").resolve() == (runs / "good").resolve()


def test_run_named_latest_never_links_to_itself(tiny_data_dir: Path, runs: Path) -> None:
    """Resuming runs/latest never turns it into a link to itself."""
    assert cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", runs / "a").exit_code == 0
    for epochs in ("2", "3"):
        assert cli("train", "--resume", runs / "latest", "--epochs", epochs).exit_code == 0
        assert os.readlink(runs / "latest") == "a"


def test_output_dir_that_cannot_be_a_run_is_one_line(tiny_data_dir: Path, runs: Path, tmp_path: Path) -> None:
    """-o naming an existing file, or a path under a file, exits 2 with one line and writes nothing."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", afile), 2, "a file")
    one_line(cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", afile / "sub"), 2, "is a file, not a folder")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line(cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", fifo), 2, "FIFO")
    assert afile.read_text() == "x"


def test_read_only_place_is_one_line(tiny_data_dir: Path, runs: Path, monkeypatch) -> None:
    """-o in a read-only place exits 2 with one line (simulated: tests may run as root)."""
    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    one_line(cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", runs / "ro" / "x"), 2, "read-only")


def test_resolve_resume_and_weights_file_rules(tmp_path: Path) -> None:
    """A run directory stands for its weights file; a folder without weights or a missing path is a UsageError."""
    run = rundir.create(tmp_path / "r")
    with pytest.raises(UsageError, match="without weights"):
        rundir.weights_file(run.root)
    run.weights.write_bytes(b"x")
    assert rundir.weights_file(run.root) == run.weights
    assert rundir.weights_file(run.weights) == run.weights
    with pytest.raises(UsageError, match="does not exist"):
        rundir.weights_file(tmp_path / "nope.safetensors")
    with pytest.raises(UsageError, match="holds no checkpoint"):
        rundir.resolve_resume(run.root)


@pytest.mark.parametrize("name", ["run with spaces", "run [1]", "it's $HOME; rm -rf x"])
def test_suggested_resume_commands_paste_back_into_a_shell(tmp_path: Path, name: str) -> None:
    """The `--resume PATH` that an interrupted run and a refused output dir print is shell-quoted:
    split as a shell would, it gives back the exact folder."""
    import shlex
    import signal

    from cifarctl.train import _interrupted

    folder = tmp_path / name
    command = str(_interrupted(signal.SIGINT, folder)).split("resume with: ", 1)[1]
    assert shlex.split(command) == ["cifarctl", "train", "--resume", str(folder)]
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"x")  # what makes it hold a run
    with pytest.raises(UsageError) as err:
        rundir.refuse_existing(rundir.RunDir(folder), overwrite=False)
    quoted = str(err.value).split("--resume ", 1)[1].split(", replace it", 1)[0]
    assert shlex.split(quoted) == [str(folder)]
