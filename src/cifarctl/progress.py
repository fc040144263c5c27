"""Progress reporting for long work: a Rich bar on a terminal, plain periodic lines elsewhere.

The core takes a `Reporter` and never decides how things are shown; the CLI picks one.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt_fields(fields: dict[str, Any]) -> str:
    return "  ".join(str(v) for v in fields.values() if v not in (None, ""))


class Task:
    """One unit of long work with a known total (bytes or items)."""

    def __init__(self, total: float | None) -> None:
        self.total = total
        self.completed = 0.0
        self.fields: dict[str, Any] = {}

    def advance(self, n: float = 1, **fields: Any) -> None:
        """Record `n` more units done and optionally update the shown fields."""
        self.completed += n
        self.fields.update(fields)
        self._refresh()

    def update(self, completed: float | None = None, **fields: Any) -> None:
        """Set the units done so far and optionally the shown fields."""
        if completed is not None:
            self.completed = completed
        self.fields.update(fields)
        self._refresh()

    def reset(self, completed: float = 0, total: float | None = None) -> None:
        """Start counting again, e.g. when a download restarts from zero."""
        self.completed = completed
        if total is not None:
            self.total = total
        self._refresh()

    def _refresh(self) -> None:
        pass

    def __enter__(self) -> Task:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Finish the display of this task (without a final summary line when it failed)."""


class Reporter:
    """Shows nothing; the base for the terminal and plain-text reporters."""

    def task(self, description: str, total: float | None, unit: str = "items") -> Task:
        """Start a task; `unit` is "bytes" or "items"."""
        return Task(total)

    def log(self, message: str) -> None:
        """Print one line of progress news."""


class PlainReporter(Reporter):
    """Periodic plain lines (no redraws, no escape codes) for logs and pipes."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.every_s = every_s

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def task(self, description: str, total: float | None, unit: str = "items") -> Task:
        return _PlainTask(self, description, total, unit)


class _PlainTask(Task):
    def __init__(self, reporter: PlainReporter, description: str, total: float | None, unit: str) -> None:
        super().__init__(total)
        self.reporter, self.description, self.unit = reporter, description, unit
        self.start = self.last = time.monotonic()
        self.start_completed = 0.0
        self.printed: str | None = None

    def reset(self, completed: float = 0, total: float | None = None) -> None:
        self.start_completed = completed
        self.start = time.monotonic()
        super().reset(completed, total)

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.completed - self.start_completed) / elapsed
        fmt = _human_bytes if self.unit == "bytes" else (lambda n: f"{int(n):,}")
        parts = [f"{self.description}: {fmt(self.completed)}"]
        if self.total:
            parts[0] += f"/{fmt(self.total)} ({100 * self.completed / self.total:.0f}%)"
            if rate > 0:
                parts.append(f"ETA {max(self.total - self.completed, 0) / rate:.0f}s")
        parts.append(f"{fmt(rate)}/s" if self.unit == "bytes" else f"{rate:,.0f}/s")
        extra = _fmt_fields(self.fields)
        return "  ".join(parts + ([extra] if extra else []))

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.reporter.every_s:
            self.last = now
            self._print()

    def _print(self) -> None:
        line = self._line()
        if line != self.printed:
            self.printed = line
            self.reporter.log(line)

    def close(self, failed: bool = False) -> None:
        if not failed:
            self._print()


class RichReporter(Reporter):
    """A live Rich progress bar per task, for an interactive terminal."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def log(self, message: str) -> None:
        from rich.text import Text

        self.console.print(Text(message), highlight=False, soft_wrap=True)

    def task(self, description: str, total: float | None, unit: str = "items") -> Task:
        return _RichTask(self.console, description, total, unit)


class _RichTask(Task):
    def __init__(self, console: Any, description: str, total: float | None, unit: str) -> None:
        from rich import progress as rp

        super().__init__(total)
        if unit == "bytes":
            columns = [rp.TextColumn("{task.description}", markup=False), rp.BarColumn(), rp.DownloadColumn(),
                       rp.TransferSpeedColumn(), rp.TimeRemainingColumn()]
        else:
            columns = [rp.TextColumn("{task.description}", markup=False), rp.BarColumn(), rp.MofNCompleteColumn(),
                       rp.TextColumn("{task.fields[info]}", markup=False),
                       rp.TimeRemainingColumn(elapsed_when_finished=True)]
        self._progress = rp.Progress(*columns, console=console, transient=False)
        self._progress.start()
        self._id = self._progress.add_task(description, total=total, info="")

    def reset(self, completed: float = 0, total: float | None = None) -> None:
        self._progress.reset(self._id, completed=completed, total=total or self.total)
        super().reset(completed, total)

    def _refresh(self) -> None:
        self._progress.update(self._id, completed=self.completed, info=_fmt_fields(self.fields))

    def close(self, failed: bool = False) -> None:
        self._refresh()
        self._progress.stop()


def make_reporter(console: Any) -> Reporter:
    """A Rich reporter when `console` is a terminal, else plain lines on the console's stream."""
    if console.is_terminal:
        return RichReporter(console)
    return PlainReporter(console.file)
