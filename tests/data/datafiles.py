"""Writers of small files in the real formats (IDX, CIFAR pickles and archives) and
a loopback HTTP server, for the data tests. Written independently of the readers."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import pickle
import socket
import struct
import tarfile
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from bbdrop.data import RemoteFile

IDX_CODES = {
    "uint8": 0x08,
    "int8": 0x09,
    "int16": 0x0B,
    "int32": 0x0C,
    "float32": 0x0D,
    "float64": 0x0E,
}
MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``: magic, big-endian uint32 sizes, big-endian data."""
    header = bytes([0, 0, IDX_CODES[array.dtype.name], array.ndim])
    header += b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    blob = idx_bytes(array)
    path.write_bytes(gzip.compress(blob, mtime=0) if gz else blob)
    return path


def mnist_arrays(n_train: int, n_test: int, seed: int, side: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        MNIST_NAMES[0]: rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        MNIST_NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        MNIST_NAMES[2]: rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        MNIST_NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist(folder: Path, arrays: Mapping[str, np.ndarray], gz: bool = True) -> list[Path]:
    """The four MNIST files in ``folder`` (created), as ``<name>.gz`` or raw ``<name>``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_idx(folder / (f"{name}.gz" if gz else name), arrays[name], gz) for name in MNIST_NAMES
    ]


def remote_files(blobs: Mapping[str, bytes]) -> tuple[RemoteFile, ...]:
    """RemoteFiles with the true size and SHA-256 of each blob."""
    return tuple(
        RemoteFile(name, hashlib.sha256(b).hexdigest(), len(b), (name.removesuffix(".gz"),))
        for name, b in blobs.items()
    )


# -- CIFAR --------------------------------------------------------------------------------
class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles the way Python 2's cPickle wrote the CIFAR batches: every str
    and bytes as a Python 2 ``str`` (BINSTRING), numpy globals under ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")  # type: ignore[attr-defined]
        name = name or obj.__qualname__  # type: ignore[attr-defined]
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_batch(
    n: int, num_classes: int, seed: int, cifar100: bool = False
) -> tuple[dict[str, object], np.ndarray, np.ndarray]:
    """A batch dict with Python 2 style str keys, its images (N, 3, 32, 32), labels."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n)
    batch: dict[str, object] = {"batch_label": "testing batch", "data": data}
    batch["filenames"] = [f"img_{i}.png" for i in range(n)]
    if cifar100:
        batch["fine_labels"] = [int(v) for v in labels]
        batch["coarse_labels"] = [int(v) // 5 for v in labels]
    else:
        batch["labels"] = [int(v) for v in labels]
    # The documented layout: 1024 red, 1024 green, 1024 blue values, rows of 32.
    images = np.stack([data[:, c * 1024 : (c + 1) * 1024].reshape(n, 32, 32) for c in range(3)], 1)
    return batch, images, labels


def write_cifar(
    root: Path, cifar100: bool, n: int = 4, archive: bool = False
) -> tuple[Path, dict[str, np.ndarray]]:
    """A miniature CIFAR-10 (6 batches of ``n``) or CIFAR-100 (train 2n, test n) as the
    extracted folder under ``root`` or as ``root/<archive>.tar.gz``; returns the
    path and the expected train/test arrays."""
    folder = "cifar-100-python" if cifar100 else "cifar-10-batches-py"
    if cifar100:
        names = {"train": 2 * n, "test": n}
    else:
        names = {f"data_batch_{i}": n for i in range(1, 6)} | {"test_batch": n}
    blobs, train, test = {}, [], []
    for i, (name, count) in enumerate(names.items()):
        batch, images, labels = cifar_batch(count, 100 if cifar100 else 10, i, cifar100)
        blobs[name] = py2_pickle(batch)
        (test if "test" in name else train).append((images, labels))
    blobs["meta" if cifar100 else "batches.meta"] = py2_pickle({"label_names": ["a", "b"]})
    expected = {
        "train_x": np.concatenate([x for x, _ in train]),
        "train_y": np.concatenate([y for _, y in train]),
        "test_x": np.concatenate([x for x, _ in test]),
        "test_y": np.concatenate([y for _, y in test]),
    }
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        path = root / f"{folder.removesuffix('-batches-py').removesuffix('-python')}-python.tar.gz"
        path.write_bytes(tar_gz({f"{folder}/{k}": v for k, v in blobs.items()}))
    else:
        path = root / folder
        path.mkdir()
        for k, v in blobs.items():
            (path / k).write_bytes(v)
    return path, expected


def tar_gz(members: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folders = sorted({name.split("/")[0] for name in members if "/" in name})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


# -- loopback HTTP server -----------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: _FileServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(self.server.lengths.get(self.path, len(body))))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _FileServer(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    lengths: dict[str, int]
    requests: list[str]


@contextlib.contextmanager
def serve(
    files: Mapping[str, bytes], lengths: Mapping[str, int] | None = None
) -> Iterator[_FileServer]:
    """Serve ``{"/path": bytes}`` on 127.0.0.1 (a free port) until the block ends;
    ``lengths`` overrides the Content-Length sent for a path."""
    server = _FileServer(("127.0.0.1", 0), _Handler)
    server.files, server.lengths, server.requests = dict(files), dict(lengths or {}), []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def url_of(server: ThreadingHTTPServer, prefix: str = "/") -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{prefix}"


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]
