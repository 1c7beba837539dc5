"""Checks against real files, where the machine has them (skipped otherwise).

Debian's ``dataset-fashion-mnist`` installs the published Fashion-MNIST files
recompressed by strip-nondeterminism: the same deflate stream, CRC and length,
but the gzip header lost its file name (FNAME flag) and got a new mtime. Putting
the original header back must give the published size and SHA-256, which checks
the checksum table against bytes on this machine rather than only against
another list.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from bbdrop.data import load_dataset
from bbdrop.data.datasets import FASHION_MNIST_FILES

DEBIAN = Path("/usr/share/datasets")
# The original gzip mtimes, found by search over 2017 with the published SHA-256s.
ORIGINAL_MTIME = {
    "train-images-idx3-ubyte.gz": 1504176606,  # 2017-08-31 10:50:06 UTC
    "train-labels-idx1-ubyte.gz": 1504176606,
    "t10k-images-idx3-ubyte.gz": 1504176627,
    "t10k-labels-idx1-ubyte.gz": 1504176627,  # 10:50:27 UTC
}

needs_debian = pytest.mark.skipif(
    not (DEBIAN / "fashion-mnist").is_dir(),
    reason="apt-get install dataset-fashion-mnist to run this check",
)


def _original_header_restored(blob: bytes, name: str) -> bytes:
    if blob[:4] != b"\x1f\x8b\x08\x00":
        raise AssertionError(f"{name}: expected a gzip header without flags, got {blob[:4].hex()}")
    header = b"\x1f\x8b\x08\x08" + struct.pack("<I", ORIGINAL_MTIME[name]) + blob[8:10]
    return header + name.removesuffix(".gz").encode() + b"\x00" + blob[10:]


@needs_debian
@pytest.mark.parametrize("remote", FASHION_MNIST_FILES, ids=lambda f: f.name)
def test_debian_fashion_mnist_is_the_published_file(remote) -> None:
    blob = _original_header_restored(
        (DEBIAN / "fashion-mnist" / remote.name).read_bytes(), remote.name
    )
    assert len(blob) == remote.size
    assert hashlib.sha256(blob).hexdigest() == remote.sha256


@needs_debian
def test_debian_fashion_mnist_loads_offline() -> None:
    ds = load_dataset("fashion-mnist", download=False, progress=False)
    assert ds.location == DEBIAN / "fashion-mnist"
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
