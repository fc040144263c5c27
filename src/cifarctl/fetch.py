"""Resumable HTTP download into `<file>.part`, with retries and an md5 helper."""

from __future__ import annotations

import errno
import hashlib
import http.client
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from cifarctl.errors import CifarctlError
from cifarctl.progress import Reporter

CHUNK = 1 << 20  # 1 MiB reads keep Python overhead negligible at any link speed


class _Transient(Exception):
    """A failure worth retrying (cut connection, timeout, 5xx)."""


def md5_file(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


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


def _attempt(url: str, part: Path, reporter_task, timeout: float) -> None:
    """One GET (ranged when part of the file is already here); raises _Transient on retryable errors."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "cifarctl"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        response = urllib.request.urlopen(request, timeout=timeout)
    except (http.client.InvalidURL, ValueError) as err:
        raise CifarctlError(f"{url} is not a valid URL ({err}); check --source") from err
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            if _content_range_total(err.headers.get("Content-Range")) == offset:
                return  # an earlier run got every byte but stopped before the part was checked
            # The part is longer than the file: start over rather than guess.
            part.unlink()
            raise _Transient("range not satisfiable; restarting") from err
        if err.code >= 500 or err.code == 429:
            raise _Transient(f"server error {err.code}") from err
        raise CifarctlError(f"{url} answered HTTP {err.code} {err.reason}; check the URL or pass --source") from err
    with response:
        resumed = bool(offset) and response.status == 206 and \
            _content_range_start(response.headers.get("Content-Range")) == offset
        if response.status == 206 and not resumed:
            # A partial body that does not start where the part ends cannot be used as is.
            part.unlink(missing_ok=True)
            raise _Transient("the server sent an unexpected byte range; restarting")
        if not resumed:
            offset = 0  # the server ignored Range: its body is the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        reporter_task.reset(completed=offset, total=total)
        received = 0
        with open(part, "ab" if resumed else "wb") as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (http.client.HTTPException, OSError) as err:
                    raise _Transient(f"connection broke after {offset + received:,} bytes") from err
                if not block:
                    break
                out.write(block)  # a write error (disk full) is not the network's: it is not retried
                received += len(block)
                reporter_task.advance(len(block))
        if length is not None and received < int(length):
            raise _Transient(f"connection closed after {offset + received:,} of {total:,} bytes")


def fetch(url: str, part: Path, reporter: Reporter, *, retries: int = 4, backoff_s: float = 1.0,
          timeout: float = 30.0) -> Path:
    """Download `url` into `part`, resuming a partial file with an HTTP Range request.

    Transient errors are retried `retries` times, waiting backoff_s, 2*backoff_s, ... between tries.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    with reporter.task(f"downloading {url.rsplit('/', 1)[-1]}", None, unit="bytes") as task:
        for attempt in range(retries + 1):
            try:
                _attempt(url, part, task, timeout)
                return part
            except urllib.error.URLError as err:
                if _no_network(err):
                    raise CifarctlError(
                        f"cannot reach {url} (no network?); to use a local copy, pass --source PATH"
                    ) from err
                if isinstance(err.reason, str):  # urllib's own complaints ("no host given"): not transient
                    raise CifarctlError(f"{url} is not a usable URL ({err.reason}); check --source") from err
                reason = f"{err.reason}"
            except (_Transient, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                reason = str(err) or type(err).__name__
            if attempt == retries:
                break
            wait = backoff_s * 2**attempt
            reporter.log(f"download interrupted ({reason}); retrying in {wait:g}s, keeping {part.name}")
            time.sleep(wait)
    raise CifarctlError(
        f"download of {url} failed after {retries + 1} tries ({reason}); rerun to resume, "
        "or pass --source PATH to use a local copy"
    )
