"""Test helpers: tiny CIFAR-10 archives in the exact official format, image-folder trees and
tars, hostile and oversized archives, hand-made PNG chunks, a local HTTP server that can cut a
connection or ignore Range, and raw servers that trickle, stall or send too much."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
OFFICIAL_DIR = "cifar-10-batches-py"


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --- Python-2 style pickles ------------------------------------------------------------------

class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, so its dispatch table can be changed
    """Writes what Python 2's cPickle wrote for the CIFAR-10 batches: protocol 2, every str and
    bytes as a Python 2 byte string (BINSTRING), and numpy.core.multiarray._reconstruct."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: Any) -> None:
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "")
        if getattr(obj, "__name__", "") == "_reconstruct" and "multiarray" in module:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(obj: Any) -> bytes:
    """`obj` pickled the way the official (Python 2) CIFAR-10 files are."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


# --- the official archive ---------------------------------------------------------------------

@dataclass
class OfficialArchive:
    """A tiny archive in the official layout and the images (N, 32, 32, 3) HWC it holds."""

    path: Path
    md5: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def _batch(images_hwc: np.ndarray, labels: np.ndarray, label: str, rng: np.random.Generator) -> dict:
    rows = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072)  # R plane, G plane, B plane
    return {
        "batch_label": label,
        "labels": [int(x) for x in labels],
        "data": np.ascontiguousarray(rows, dtype=np.uint8),
        "filenames": [f"{CLASSES[y]}_s_{rng.integers(0, 10**6):06d}.png" for y in labels],
    }


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_300_000_000
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_300_000_000
    tar.addfile(info)


def build_official_archive(path: Path, per_batch_per_class: int = 1, test_per_class: int = 2, seed: int = 0,
                           replace: dict[str, bytes] | None = None) -> OfficialArchive:
    """Write cifar-10-python.tar.gz-like `path`: cifar-10-batches-py/ with data_batch_1..5,
    test_batch, batches.meta and readme.html, all pickled as Python 2 did. `replace` swaps a
    member's bytes (e.g. a hostile pickle)."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    train_x, train_y = [], []
    for i in range(1, 6):
        y = np.repeat(np.arange(10), per_batch_per_class)
        rng.shuffle(y)
        x = rng.integers(0, 256, size=(len(y), 32, 32, 3), dtype=np.uint8)
        members[f"data_batch_{i}"] = py2_pickle(_batch(x, y, f"training batch {i} of 5", rng))
        train_x.append(x)
        train_y.append(y)
    ty = np.repeat(np.arange(10), test_per_class)
    rng.shuffle(ty)
    tx = rng.integers(0, 256, size=(len(ty), 32, 32, 3), dtype=np.uint8)
    members["test_batch"] = py2_pickle(_batch(tx, ty, "testing batch 1 of 1", rng))
    members["batches.meta"] = py2_pickle(
        {"num_cases_per_batch": 10 * per_batch_per_class, "label_names": list(CLASSES), "num_vis": 3072}
    )
    members.update(replace or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        add_dir(tar, OFFICIAL_DIR)
        for name in ("data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta",
                     "data_batch_2", "data_batch_5", "data_batch_1"):  # the order of the real tarball
            payload = b"<html>CIFAR-10</html>" if name == "readme.html" else members[name]
            add_bytes(tar, f"{OFFICIAL_DIR}/{name}", payload)
    return OfficialArchive(path, md5_bytes(path.read_bytes()), np.concatenate(train_x),
                           np.concatenate(train_y).astype(np.int64), tx, ty.astype(np.int64))


# --- hostile payloads -------------------------------------------------------------------------

class SystemTouch:
    """Unpickling this runs os.system('touch <path>')."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class OpenForWrite:
    """Unpickling this calls builtins.open(path, 'w'), creating the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def hostile_batch(payload: Any) -> bytes:
    """A batch dict whose 'data' runs `payload`'s __reduce__ when unpickled."""
    return pickle.dumps({"batch_label": "training batch 1 of 5", "labels": [0], "data": payload,
                         "filenames": ["x.png"]}, protocol=2)


def build_tar(path: Path, members: list[tuple], compress: bool = True) -> Path:
    """Write a tar from specs: ("file", name, bytes), ("dir", name), ("symlink", name, target),
    ("hardlink", name, target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for kind, name, *rest in members:
            if kind == "file":
                add_bytes(tar, name, rest[0])
            elif kind == "dir":
                add_dir(tar, name)
            else:
                info = tarfile.TarInfo(name)
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = rest[0]
                tar.addfile(info)
    return path


# --- image folders ----------------------------------------------------------------------------

def image_bytes(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(array)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    kwargs = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("WEBP", ".webp"))


@dataclass
class ImageTree:
    """An image-folder dataset: where it is and the lossless images it holds, by file path
    relative to its root (JPEGs are left out: they are lossy)."""

    root: Path
    counts: dict[str, int]
    lossless: dict[str, np.ndarray] = field(default_factory=dict)


def build_image_tree(root: Path, folders: list[str], per_class: dict[str, int] | None = None,
                     seed: int = 0) -> ImageTree:
    """train/<folder>/* and test/<folder>/* of 32x32 RGB images, cycling through PNG, JPEG,
    BMP and WebP (lossless), `per_class[split]` images per folder."""
    per_class = per_class or {"train": 4, "test": 2}
    rng = np.random.default_rng(seed)
    tree = ImageTree(root, {s: 0 for s in per_class})
    k = 0
    for split, n in per_class.items():
        for folder in folders:
            d = root / split / folder
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                fmt, ext = FORMATS[k % len(FORMATS)]
                k += 1
                img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                rel = f"{split}/{folder}/img{i}{ext}"
                (root / rel).write_bytes(image_bytes(img, fmt))
                if fmt != "JPEG":
                    tree.lossless[rel] = img
                tree.counts[split] += 1
    return tree


def tar_directory(src: Path, path: Path, arcname: str = "mydata") -> Path:
    """Pack folder `src` into tar(.gz) `path` under top-level folder `arcname`."""
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        tar.add(src, arcname=arcname)
    return path


# --- HTTP server ------------------------------------------------------------------------------

class FileServer:
    """Serves `payload` at /<name> on 127.0.0.1 from a thread. Records each request's headers.

    range_support: answer "Range: bytes=N-" with 206 (else always 200 with the whole body).
    cut_at: the first response stops (connection closed) once the client holds this many bytes.
    delay_s: wait this long before each body, so that concurrent clients overlap.
    """

    def __init__(self, payload: bytes, name: str = "cifar-10-python.tar.gz", *, range_support: bool = True,
                 cut_at: int | None = None, delay_s: float = 0.0) -> None:
        self.payload, self.name = payload, name
        self.range_support, self.cut_at, self.delay_s = range_support, cut_at, delay_s
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.requests.append({"path": self.path, **dict(self.headers)})
                    cut = server.cut_at
                    server.cut_at = None
                if self.path != f"/{server.name}":
                    self.send_error(404)
                    return
                body, total, start = server.payload, len(server.payload), 0
                rng = self.headers.get("Range")
                if rng and server.range_support:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= total:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{total}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(total - start))
                self.end_headers()
                if server.delay_s:
                    time.sleep(server.delay_s)
                if cut is not None and start < cut:
                    self.wfile.write(body[start:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{self.name}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- oversized and hostile archives -----------------------------------------------------------

class Zeros(io.RawIOBase):
    """`size` zero bytes as a stream, so a bomb's member never sits in memory while it is built."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def zeros_tar(path: Path, sizes: dict[str, int]) -> Path:
    """A .tar.gz whose members (name: size) are all zeros: tiny on disk, `sum(sizes)` bytes unpacked."""
    with tarfile.open(path, "w:gz") as tar:
        for name, size in sizes.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, 0o644, 1_300_000_000
            tar.addfile(info, io.BufferedReader(Zeros(size)))
    return path


def lying_size_tar(path: Path, name: str, declared: int, data: bytes = b"tiny") -> Path:
    """A .tar.gz with one member whose header declares `declared` bytes but that stores only `data`."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = declared, 0o644, 1_300_000_000
    header = info.tobuf(format=tarfile.GNU_FORMAT)  # GNU base-256 sizes go beyond 8 GiB
    with gzip.open(path, "wb") as f:
        f.write(header + data.ljust(512, b"\0") + bytes(1024))
    return path


def sparse_tar(path: Path, name: str = "mydata/train/a/sparse.png", realsize: int = 4096) -> Path:
    """A .tar.gz with one old-style GNU sparse member ('S'): one 512-byte data block at offset 0 of
    a `realsize`-byte file."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = tarfile.GNUTYPE_SPARSE, 512, 0o644, 1_300_000_000
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:410] = b"%011o\0%011o\0" % (0, 512)  # one sparse entry: offset 0, 512 bytes
    header[483:495] = b"%011o\0" % realsize
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    with gzip.open(path, "wb") as f:
        f.write(bytes(header) + b"\x89PNG".ljust(512, b"\0") + bytes(1024))
    return path


def pax_header_tar(path: Path, header_bytes: int) -> Path:
    """A .tar.gz whose one member carries a pax comment of `header_bytes` bytes (compressed to almost nothing)."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("mydata/a.txt")
        info.pax_headers = {"comment": "x" * header_bytes}
        info.size = 1
        tar.addfile(info, io.BytesIO(b"a"))
    return path


# --- hand-made PNG chunks ---------------------------------------------------------------------

def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunks(before_idat: bytes = b"", after_idat: bytes = b"", size: int = 8) -> bytes:
    """A valid size x size grey RGB PNG with extra raw chunks before and after its pixel data."""
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    rows = b"".join(b"\0" + b"\x80" * (3 * size) for _ in range(size))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + before_idat + png_chunk(b"IDAT", zlib.compress(rows))
            + after_idat + png_chunk(b"IEND", b""))


def ztxt_bomb(kind: bytes = b"zTXt", unpacked: int = 4 << 20) -> bytes:
    """A compressed text chunk (zTXt or iTXt) of a few KiB that inflates to `unpacked` bytes."""
    text = zlib.compress(bytes(unpacked), 9)
    body = b"Comment\0\0" + text if kind == b"zTXt" else b"Comment\0\1\0\0\0" + text
    return png_chunk(kind, body)


# --- misbehaving HTTP servers -----------------------------------------------------------------

class RawServer:
    """A loopback HTTP server whose answers are written by hand: `respond(conn, stop)` gets each
    connection after its request headers were read, and must return once `stop` is set.

    Counts connections in `requests`; every thread is joined (with a deadline) on exit."""

    def __init__(self, respond: Any) -> None:
        self.respond = respond
        self.requests = 0
        self.stop_event = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}/file.tar.gz"

    def _serve(self) -> None:
        while not self.stop_event.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.requests += 1
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                self.respond(conn, self.stop_event)
            except OSError:
                pass  # the client hung up: that is what most tests want it to do

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(5)
        for t in self.threads:
            t.join(5)
        self.sock.close()


def endless_body(conn: socket.socket, stop: threading.Event) -> None:
    """200 without Content-Length, then zeros until the client hangs up."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    while not stop.is_set():
        conn.sendall(bytes(65536))


def announces(length: int, sends: int) -> Any:
    """A responder that announces Content-Length `length` and then sends `sends` bytes (more or fewer)."""
    def respond(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % length)
        left = sends
        while left > 0 and not stop.is_set():
            n = min(left, 65536)
            conn.sendall(b"y" * n)
            left -= n
    return respond


def chunked_beyond(length: int) -> Any:
    """A responder that announces Content-Length `length` but sends an endless chunked body."""
    def respond(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % length)
        while not stop.is_set():
            conn.sendall(b"10000\r\n" + b"z" * 0x10000 + b"\r\n")
    return respond


def trickle(interval_s: float, headers: bool = False) -> Any:
    """A responder that sends one byte every `interval_s` seconds, of the body (announced as 1 MB)
    or, with `headers`, of an endless header line."""
    def respond(conn: socket.socket, stop: threading.Event) -> None:
        if headers:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        while not stop.wait(interval_s):
            conn.sendall(b"a")
    return respond


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Headers announcing a body, then nothing at all until the client gives up."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    stop.wait(10)


# --- CIFAR-100 --------------------------------------------------------------------------------

FINE = [f"fine{i:02d}" for i in range(100)]
COARSE = [f"coarse{i:02d}" for i in range(20)]


def build_cifar100_archive(path: Path, train_per_class: int = 1, test_per_class: int = 1,
                           seed: int = 0) -> OfficialArchive:
    """Write a cifar-100-python.tar.gz-like `path`: cifar-100-python/ with train, test and meta,
    pickled as Python 2 did, fine labels 0..99 and coarse labels fine // 5."""
    rng = np.random.default_rng(seed)
    members, arrays = {}, {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), n)
        rng.shuffle(fine)
        x = rng.integers(0, 256, size=(len(fine), 32, 32, 3), dtype=np.uint8)
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        members[split] = py2_pickle({"filenames": [f"img{i}.png" for i in range(len(x))], "batch_label": split,
                                     "fine_labels": [int(v) for v in fine],
                                     "coarse_labels": [int(v) // 5 for v in fine],
                                     "data": np.ascontiguousarray(rows)})
        arrays[split] = (x, fine.astype(np.int64))
    members["meta"] = py2_pickle({"fine_label_names": FINE, "coarse_label_names": COARSE})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        add_dir(tar, "cifar-100-python")
        for name in ("file.txt~", "train", "test", "meta"):
            add_bytes(tar, f"cifar-100-python/{name}", members.get(name, b"x"))
    return OfficialArchive(path, md5_bytes(path.read_bytes()), *arrays["train"], *arrays["test"])
