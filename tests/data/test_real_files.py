"""Checks against real files, where the machine has them (skipped otherwise).

Debian's ``dataset-fashion-mnist`` installs the published Fashion-MNIST files
recompressed by strip-nondeterminism: the same deflate stream, CRC and length,
but the gzip header lost its file name (FNAME flag) and got a new mtime. Putting
the original header back must give the published size and SHA-256, which checks
the checksum table against bytes on this machine rather than only against
another list.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from bbdrop.data import ChecksumError, load_dataset
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
def test_debian_fashion_mnist_loads_offline_and_passes_verification(
    isolated_data_env: Path,
) -> None:
    """Found through the search order (no data_dir), verified by the SHA-256 of its
    decompressed content (its own bytes are not the published ones), recorded."""
    ds = load_dataset("fashion-mnist", download=False, progress=False)
    assert ds.location == DEBIAN / "fashion-mnist"
    record = json.loads((isolated_data_env / "verified.json").read_text())["files"]
    for remote in FASHION_MNIST_FILES:
        entry = record[str(DEBIAN / "fashion-mnist" / remote.name)]
        assert entry["sha256"] == remote.content_sha256 != remote.sha256
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0


@needs_debian
def test_unpacked_fashion_mnist_is_verified_by_its_content_hash(tmp_path: Path) -> None:
    """An uncompressed alternative passes when its SHA-256 is the published content's,
    and one changed byte is caught."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for remote in FASHION_MNIST_FILES:
        source = DEBIAN / "fashion-mnist" / remote.name
        if "labels" in remote.name:  # unpacked; the images stay gzipped (and big)
            raw = gzip.decompress(source.read_bytes())
            (folder / remote.name.removesuffix(".gz")).write_bytes(raw)
        else:
            shutil.copyfile(source, folder / remote.name)
    ds = load_dataset("fashion-mnist", tmp_path, download=False, progress=False)
    assert ds.test_y.bincount().tolist() == [1000] * 10
    labels = folder / "t10k-labels-idx1-ubyte"
    blob = bytearray(labels.read_bytes())
    blob[-1] = (blob[-1] + 1) % 10
    labels.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError) as info:
        load_dataset("fashion-mnist", tmp_path, download=False, progress=False)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{labels}: not the unpacked content of the published")
    assert FASHION_MNIST_FILES[3].content_sha256 in first
