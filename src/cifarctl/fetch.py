"""Resumable HTTP download into `<file>.part`, with retries, bounded size and time, and an md5 helper."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarctl.config import env_number
from cifarctl.errors import CifarctlError
from cifarctl.progress import Reporter

CHUNK = 1 << 20  # 1 MiB reads keep Python overhead negligible at any link speed
# Ceiling for a download whose size the caller does not know: 25x the official archive (163 MiB).
DEFAULT_MAX_DOWNLOAD_BYTES = 4 << 30
# Seconds in which at least STALL_BYTES must arrive, or the connection counts as stalled.
DEFAULT_IDLE_TIMEOUT_S = 30.0
# Seconds for the whole download, retries included: the official archive at 46 KiB/s. A slower
# link is stopped here, keeps its .part, and resumes on the next run.
DEFAULT_TOTAL_TIMEOUT_S = 3600.0
# Fewer bytes than this in idle_timeout_s is a stall even if some arrive: a server trickling
# 1 byte/s would otherwise never trip a socket timeout. 1 KiB in 30 s is 34 B/s, far below any real link.
STALL_BYTES = 1024
ENV_IDLE_TIMEOUT = "CIFARCTL_DOWNLOAD_IDLE_TIMEOUT"
ENV_TOTAL_TIMEOUT = "CIFARCTL_DOWNLOAD_TIMEOUT"
ENV_MAX_BYTES = "CIFARCTL_MAX_DOWNLOAD_BYTES"
# Downloads also start from `train` and `evaluate`, which have no --source: name the command that has it.
_LOCAL_COPY = "to use a local copy, run `cifarctl download --source PATH` or set CIFARCTL_SOURCE=PATH"
_CHECK_URL = "check the URL (cifarctl download --source, or CIFARCTL_SOURCE)"


class _Transient(Exception):
    """A failure worth retrying (cut connection, stall, 5xx)."""


class _Refused(Exception):
    """The server sent (or announced) more than allowed: the part is deleted and nothing is retried."""


@dataclass(frozen=True)
class _Limits:
    max_bytes: int
    max_fix: str  # how to raise max_bytes, for the error message
    idle_s: float
    idle_fix: str
    total_s: float | None
    total_fix: str


def md5_file(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def max_download_bytes() -> int:
    """The size ceiling for downloads of unknown size: $CIFARCTL_MAX_DOWNLOAD_BYTES, else DEFAULT_MAX_DOWNLOAD_BYTES."""
    return env_number(ENV_MAX_BYTES, DEFAULT_MAX_DOWNLOAD_BYTES, int)


def _limits(max_bytes: int | None, idle_s: float | None, total_s: float | None) -> _Limits:
    """Explicit arguments win; otherwise the environment variables, then the defaults."""
    env_fix = "set {} to {}"
    if max_bytes is None:
        max_bytes, max_fix = max_download_bytes(), env_fix.format(ENV_MAX_BYTES, "a larger number of bytes")
    else:
        max_fix = f"this is more than the file should hold; check the URL, or {_LOCAL_COPY}"
    idle_fix = env_fix.format(ENV_IDLE_TIMEOUT, "more seconds to wait longer")
    if idle_s is None:
        idle_s = env_number(ENV_IDLE_TIMEOUT, DEFAULT_IDLE_TIMEOUT_S)
    total_fix = env_fix.format(ENV_TOTAL_TIMEOUT, "more seconds to allow longer")
    if total_s is None:
        total_s = env_number(ENV_TOTAL_TIMEOUT, DEFAULT_TOTAL_TIMEOUT_S)
    return _Limits(max_bytes, max_fix, idle_s, idle_fix, None if total_s == float("inf") else total_s, total_fix)


class _Clock:
    """The whole-download deadline. It is checked between reads; a read that blocks past it (a
    server can trickle headers as well as a body) is ended by a timer thread that shuts the
    connection's sockets down, which makes the blocked recv return at once."""

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._fired = False

    def remaining(self) -> float:
        return float("inf") if self.at is None else self.at - time.monotonic()

    def expired(self) -> bool:
        return self._fired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> socket.socket:
        """Register a socket of the current attempt; returns it."""
        with self._lock:
            self._sockets.append(sock)
            fired = self._fired
        if fired:
            _shut(sock)
        return sock

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Run one attempt with the timer set to the deadline."""
        timer = None
        if self.at is not None:
            timer = threading.Timer(max(self.remaining(), 0.0), self._fire)
            timer.daemon = True
            timer.start()
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._sockets.clear()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed, or detached by the TLS wrapper
        sock.shutdown(socket.SHUT_RDWR)


def _opener(watch: Callable[[socket.socket], socket.socket]) -> urllib.request.OpenerDirector:
    """urllib's default opener, except that every socket it connects is handed to `watch`."""

    def watched(base: type) -> type:
        class Watched(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                create = self._create_connection  # the raw socket, watched before any TLS handshake
                self._create_connection = lambda *a, **k: watch(create(*a, **k))

            def connect(self) -> None:
                super().connect()
                watch(self.sock)  # the TLS socket that replaced the raw one

        return Watched

    http_conn, https_conn = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(http_conn, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(https_conn, req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def _no_network(err: BaseException) -> bool:
    """True for failures that mean "no route to that host at all", where retrying is pointless."""
    reason = getattr(err, "reason", err)
    if isinstance(reason, socket.gaierror):
        return True
    return isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(match.group(1)) if match else None


def _content_range_total(value: str | None) -> int | None:
    match = re.match(r"bytes \*/(\d+)", value or "")
    return int(match.group(1)) if match else None


def _int_header(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _open(url: str, part: Path, offset: int, limits: _Limits, opener: urllib.request.OpenerDirector) -> Any:
    """The response to one GET (ranged from `offset`), or None when the part is already complete."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "cifarctl"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        return opener.open(request, timeout=limits.idle_s)  # the socket timeout: no byte for idle_s fails
    except (http.client.InvalidURL, ValueError) as err:
        raise CifarctlError(f"{url} is not a valid URL ({err}); {_CHECK_URL}") from err
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            if _content_range_total(err.headers.get("Content-Range")) == offset:
                return None  # an earlier run got every byte but stopped before the part was checked
            # The part is longer than the file: start over rather than guess.
            part.unlink()
            raise _Transient("range not satisfiable; restarting") from err
        if err.code >= 500 or err.code == 429:
            raise _Transient(f"server error {err.code}") from err
        raise CifarctlError(f"{url} answered HTTP {err.code} {err.reason}; {_CHECK_URL}") from err


def _attempt(url: str, part: Path, task: Any, limits: _Limits, clock: _Clock,
             opener: urllib.request.OpenerDirector) -> None:
    """One GET (ranged when part of the file is already here); raises _Transient on retryable errors."""
    offset = part.stat().st_size if part.exists() else 0
    if offset > limits.max_bytes:  # left by a run with a larger limit: it cannot be resumed within this one
        part.unlink()
        offset = 0
    response = _open(url, part, offset, limits, opener)
    if response is None:
        return
    with response:
        resumed = bool(offset) and response.status == 206 and \
            _content_range_start(response.headers.get("Content-Range")) == offset
        if response.status == 206 and not resumed:
            # A partial body that does not start where the part ends cannot be used as is.
            part.unlink(missing_ok=True)
            raise _Transient("the server sent an unexpected byte range; restarting")
        if not resumed:
            offset = 0  # the server ignored Range: its body is the whole file
        length = _int_header(response.headers.get("Content-Length"))
        total = offset + length if length is not None else None
        if total is not None and total > limits.max_bytes:
            raise _Refused(f"{url} announces {total:,} bytes, more than the {limits.max_bytes:,}-byte limit; "
                           f"{limits.max_fix}")
        task.reset(completed=offset, total=total)
        with open(part, "ab" if resumed else "wb") as out:
            size = _copy_body(url, response, out, offset, total, task, limits, clock)
        if total is not None and size < total:
            raise _Transient(f"connection closed after {size:,} of {total:,} bytes")


def _copy_body(url: str, response: Any, out: Any, size: int, total: int | None, task: Any, limits: _Limits,
               clock: _Clock) -> int:
    """Append the body to `out` until it ends; returns the bytes now in the part.

    read1 returns whatever one recv brings, so deadlines are checked even while a server trickles.
    """
    read = getattr(response, "read1", response.read)
    ceiling = min(limits.max_bytes, total) if total is not None else limits.max_bytes
    window_start, window_bytes = time.monotonic(), 0
    while True:
        try:
            block = read(CHUNK)
        except TimeoutError as err:
            if clock.expired():
                raise _DeadlinePassed from err
            raise _Transient(f"stalled: no data for {limits.idle_s:g} s after {size:,} bytes") from err
        except (http.client.HTTPException, OSError) as err:
            if clock.expired():
                raise _DeadlinePassed from err
            raise _Transient(f"connection broke after {size:,} bytes") from err
        if clock.expired():  # also when the body "ended" because the deadline timer shut the socket
            raise _DeadlinePassed
        if not block:
            return size
        if size + len(block) > ceiling:
            what = f"the {total:,} bytes it announced" if ceiling == total else \
                f"the {limits.max_bytes:,}-byte limit; {limits.max_fix}"
            raise _Refused(f"download of {url} stopped: the server sent more than {what}")
        out.write(block)  # a write error (disk full) is not the network's: it is not retried
        size += len(block)
        task.advance(len(block))
        window_bytes += len(block)
        now = time.monotonic()
        if window_bytes >= STALL_BYTES:
            window_start, window_bytes = now, 0
        elif now - window_start > limits.idle_s:
            raise _Transient(f"stalled: under {STALL_BYTES:,} bytes in {limits.idle_s:g} s, after {size:,} bytes")


class _DeadlinePassed(Exception):
    """The whole-download deadline passed during an attempt."""


def _deadline_error(url: str, part: Path, limits: _Limits) -> CifarctlError:
    got = part.stat().st_size if part.exists() else 0
    return CifarctlError(f"download of {url} did not finish within {limits.total_s:g} s ({got:,} bytes arrived); "
                         f"rerun to resume from {part.name}, {limits.total_fix}, or {_LOCAL_COPY}")


def fetch(url: str, part: Path, reporter: Reporter, *, retries: int = 4, backoff_s: float = 1.0,
          max_bytes: int | None = None, idle_timeout_s: float | None = None, total_timeout_s: float | None = None,
          timeout: float | None = None) -> Path:
    """Download `url` into `part`, resuming a partial file with an HTTP Range request.

    Transient errors (cut connections, stalls, 5xx) are retried `retries` times, waiting backoff_s,
    2*backoff_s, ... between tries. Limits (None: the environment variable, else the default):
    max_bytes (CIFARCTL_MAX_DOWNLOAD_BYTES, DEFAULT_MAX_DOWNLOAD_BYTES) is refused from the
    announced size or as soon as it is crossed, deleting the part; idle_timeout_s
    (CIFARCTL_DOWNLOAD_IDLE_TIMEOUT, 30 s) is the socket timeout, and fewer than STALL_BYTES in
    that long is a stall; total_timeout_s (CIFARCTL_DOWNLOAD_TIMEOUT, 3600 s; inf: none) bounds the
    whole call, retries included, and keeps the part. `timeout` is the old name of idle_timeout_s.
    """
    limits = _limits(max_bytes, idle_timeout_s if idle_timeout_s is not None else timeout, total_timeout_s)
    clock = _Clock(limits.total_s)
    opener = _opener(clock.watch)
    part.parent.mkdir(parents=True, exist_ok=True)
    reason, stalled = "", False
    with reporter.task(f"downloading {url.rsplit('/', 1)[-1]}", None, unit="bytes") as task:
        for attempt in range(retries + 1):
            try:
                with clock.armed():
                    _attempt(url, part, task, limits, clock, opener)
                return part
            except _Refused as err:
                part.unlink(missing_ok=True)
                raise CifarctlError(str(err)) from None
            except CifarctlError:
                raise
            except Exception as err:
                if clock.expired():
                    raise _deadline_error(url, part, limits) from err
                reason = _retry_reason(url, err, limits.idle_s)
                stalled = reason.startswith("stalled")
            if attempt == retries:
                break
            wait = backoff_s * 2**attempt
            if wait >= clock.remaining():
                raise _deadline_error(url, part, limits)
            reporter.log(f"download interrupted ({reason}); retrying in {wait:g}s, keeping {part.name}")
            time.sleep(wait)
    hint = f"; or {limits.idle_fix}" if stalled else ""
    raise CifarctlError(
        f"download of {url} failed after {retries + 1} tries ({reason}); rerun to resume, "
        f"or {_LOCAL_COPY}{hint}"
    )


def _retry_reason(url: str, err: Exception, idle_s: float) -> str:
    """Why an attempt failed, when retrying may help; re-raises `err` (or a CifarctlError) when it cannot."""
    if isinstance(err, urllib.error.URLError):
        if _no_network(err):
            raise CifarctlError(f"cannot reach {url} (no network?); {_LOCAL_COPY}") from err
        if isinstance(err.reason, str):  # urllib's own complaints ("no host given"): not transient
            raise CifarctlError(f"{url} is not a usable URL ({err.reason}); {_CHECK_URL}") from err
        return f"{err.reason}"
    if isinstance(err, TimeoutError):
        return f"stalled: no answer for {idle_s:g} s"  # while connecting or waiting for the headers
    if isinstance(err, (_Transient, ConnectionError, http.client.HTTPException)):
        return str(err) or type(err).__name__
    raise err
