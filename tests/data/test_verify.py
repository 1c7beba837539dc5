"""Files already on disk are checked against the published SHA-256 once, and the
check is remembered in <user cache>/verified.json."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest
from datafiles import (
    MNIST_NAMES,
    mnist_arrays,
    remote_files,
    serve,
    url_of,
    write_cifar,
    write_mnist,
)

import bbdrop.data.verify as verify_module
from bbdrop.data import ChecksumError, get_dataset_spec, load_dataset
from bbdrop.data.datasets import MNIST_FILES

GZ = [f"{name}.gz" for name in MNIST_NAMES]


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every file hashed by the verification, as (file name, decompressed?)."""
    calls: list[tuple[str, bool]] = []
    real = verify_module.file_sha256

    def counting(path, *, gunzip: bool = False) -> str:
        calls.append((Path(path).name, gunzip))
        return real(path, gunzip=gunzip)

    monkeypatch.setattr(verify_module, "file_sha256", counting)
    return calls


@pytest.fixture
def published(tmp_path: Path):
    """A small MNIST under tmp_path/data/mnist and a spec whose checksums are its own:
    for this test, these files are the published ones."""
    paths = write_mnist(tmp_path / "data" / "mnist", mnist_arrays(4, 3, seed=1))
    blobs = {p.name: p.read_bytes() for p in paths}
    spec = dataclasses.replace(get_dataset_spec("mnist"), files=remote_files(blobs))
    return spec, tmp_path / "data"


def _load(spec, data_dir: Path, **kwargs):
    return load_dataset(spec, data_dir, download=False, progress=False, **kwargs)


def _record(cache: Path) -> dict:
    return json.loads((cache / "verified.json").read_text())["files"]


def _rewrite(path: Path, blob: bytes) -> None:
    """New content with a new mtime, as an editor or a copy would leave it (set
    explicitly: two writes can share a coarse filesystem timestamp)."""
    old = path.stat().st_mtime_ns
    path.write_bytes(blob)
    os.utime(path, ns=(old + 10**9, old + 10**9))


def test_a_verified_file_is_hashed_once(published, hashed: list, isolated_data_env: Path) -> None:
    spec, root = published
    _load(spec, root)
    assert sorted(hashed) == sorted((name, False) for name in GZ)
    _load(spec, root)
    assert len(hashed) == 4  # the second load hashed nothing
    record = _record(isolated_data_env)
    for remote in spec.files:
        path = root / "mnist" / remote.name
        assert record[str(path)] == {
            "size": path.stat().st_size,
            "mtime_ns": path.stat().st_mtime_ns,
            "sha256": remote.sha256,
        }


@pytest.mark.parametrize("change", ["same size", "one byte longer"])
def test_a_modified_file_is_verified_again_and_rejected(
    published, hashed: list, change: str
) -> None:
    spec, root = published
    _load(spec, root)
    path = root / "mnist" / GZ[1]
    blob = path.read_bytes()
    new = blob[:-1] + bytes([blob[-1] ^ 1]) if change == "same size" else blob + b"\0"
    _rewrite(path, new)
    hashed.clear()
    with pytest.raises(ChecksumError) as info:
        _load(spec, root)
    message = str(info.value)
    assert "\n" not in message
    expected = spec.files[1].sha256
    size = "" if change == "same size" else f"; size {len(new)} bytes, expected {len(blob)}"
    assert message == (
        f"{path}: not the published {GZ[1]}: SHA-256 {hashlib.sha256(new).hexdigest()}, "
        f"expected {expected}{size}; delete it to download it again, or replace it with the "
        "published file (verify=False, or data.verify=false in a run's settings, skips this "
        "check)"
    )
    assert [name for name, _ in hashed] == [GZ[1]]  # the three others are still vouched for
    path.unlink()  # the fix the message gives: download it again
    with serve({f"/{GZ[1]}": blob}) as server:
        load_dataset(spec, root, progress=False, mirrors=[url_of(server)])
    assert path.read_bytes() == blob


def test_the_registered_checksums_reject_files_that_are_not_the_published_ones(
    tmp_path: Path,
) -> None:
    write_mnist(tmp_path / "mnist", mnist_arrays(3, 2, seed=0))
    with pytest.raises(ChecksumError, match=f"expected {MNIST_FILES[0].sha256}; size"):
        load_dataset("mnist", tmp_path, download=False)
    assert load_dataset("mnist", tmp_path, download=False, verify=False).train_x.shape[0] == 3


@pytest.mark.parametrize(
    "content",
    [
        b"\x00{not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"version": 99, "files": {}}',
        b'{"version": 1, "files": []}',
        b'{"version": 1, "files": {"/x": 3}}',
    ],
)
def test_a_corrupt_record_is_ignored_and_rewritten(
    published, hashed: list, isolated_data_env: Path, content: bytes
) -> None:
    spec, root = published
    isolated_data_env.mkdir(parents=True)
    (isolated_data_env / "verified.json").write_bytes(content)
    _load(spec, root)
    assert len(hashed) == 4
    assert len(_record(isolated_data_env)) == 4
    _load(spec, root)
    assert len(hashed) == 4


def test_a_record_for_another_checksum_vouches_for_nothing(
    published, hashed: list, isolated_data_env: Path
) -> None:
    spec, root = published
    _load(spec, root)
    record = json.loads((isolated_data_env / "verified.json").read_text())
    for entry in record["files"].values():
        entry["sha256"] = "0" * 64
    (isolated_data_env / "verified.json").write_text(json.dumps(record))
    _load(spec, root)
    assert len(hashed) == 8


@pytest.mark.parametrize("how", ["read-only folder", "cache is a file", "record is a folder"])
def test_a_cache_that_cannot_be_written_means_verifying_every_time(
    published, hashed: list, isolated_data_env: Path, how: str
) -> None:
    spec, root = published
    if how == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        isolated_data_env.mkdir(parents=True)
        isolated_data_env.chmod(0o555)
    elif how == "cache is a file":
        isolated_data_env.parent.mkdir(parents=True)
        isolated_data_env.write_text("not a folder")
    else:
        (isolated_data_env / "verified.json").mkdir(parents=True)
    try:
        for _ in range(2):
            assert _load(spec, root).train_x.shape[0] == 4
    finally:
        if how == "read-only folder":
            isolated_data_env.chmod(0o755)
    assert len(hashed) == 8
    if how != "cache is a file":
        assert [p.name for p in isolated_data_env.iterdir()] == ["verified.json"]  # no temp


def test_downloaded_files_are_recorded_without_hashing_them_again(
    tmp_path: Path, published, hashed: list, isolated_data_env: Path
) -> None:
    spec, source = published
    blobs = {p.name: p.read_bytes() for p in (source / "mnist").iterdir()}
    with serve({f"/{k}": v for k, v in blobs.items()}) as server:
        load_dataset(spec, tmp_path / "new", progress=False, mirrors=[url_of(server)])
    _load(spec, tmp_path / "new")
    assert hashed == []  # verified while streaming, then remembered
    assert {str(tmp_path / "new" / "mnist" / name) for name in GZ} <= set(
        _record(isolated_data_env)
    )


def _content_spec(spec, folder: Path):
    """``spec`` with the content SHA-256 of each (gzipped) file in ``folder``."""
    files = tuple(
        dataclasses.replace(
            f,
            content_sha256=hashlib.sha256(
                gzip.decompress((folder / f.name).read_bytes())
            ).hexdigest(),
        )
        for f in spec.files
    )
    return dataclasses.replace(spec, files=files)


def test_a_recompressed_file_passes_by_its_content(
    published, hashed: list, isolated_data_env: Path
) -> None:
    """Debian's case: the same data under the published name, another gzip header."""
    spec, root = published
    spec = _content_spec(spec, root / "mnist")
    path = root / "mnist" / GZ[0]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw, mtime=1591347949))  # another header
    _load(spec, root)
    assert (GZ[0], True) in hashed
    assert _record(isolated_data_env)[str(path)]["sha256"] == spec.files[0].content_sha256
    hashed.clear()
    _load(spec, root)
    assert hashed == []
    _rewrite(path, gzip.compress(raw[:-1] + b"\x07", mtime=1591347949))
    with pytest.raises(ChecksumError, match="its unpacked content is not the published data"):
        _load(spec, root)
    _rewrite(path, b"\x1f\x8b not gzip at all")
    with pytest.raises(ChecksumError, match=f"{path}: not the published {GZ[0]}"):
        _load(spec, root)


def test_an_unpacked_file_is_checked_by_its_content_hash_when_known(
    published, hashed: list
) -> None:
    spec, root = published
    spec = _content_spec(spec, root / "mnist")
    gz = root / "mnist" / GZ[3]
    raw = root / "mnist" / MNIST_NAMES[3]
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    _load(spec, root)
    assert (MNIST_NAMES[3], False) in hashed
    _rewrite(raw, raw.read_bytes()[:-1] + b"\x09")
    with pytest.raises(ChecksumError) as info:
        _load(spec, root)
    assert str(info.value).startswith(
        f"{raw}: not the unpacked content of the published {GZ[3]}: SHA-256 "
        f"{hashlib.sha256(raw.read_bytes()).hexdigest()}, expected {spec.files[3].content_sha256}"
        f"; delete it to use or download {GZ[3]} instead"
    )


def test_what_has_no_known_hash_is_left_to_the_readers(
    tmp_path: Path, hashed: list, isolated_data_env: Path
) -> None:
    """MNIST unpacked (no content hash is known) and an extracted CIFAR folder."""
    write_mnist(tmp_path / "mnist", mnist_arrays(3, 2, seed=0), gz=False)
    write_cifar(tmp_path / "cifar10", cifar100=False, n=2)
    assert load_dataset("mnist", tmp_path, download=False).train_x.shape[0] == 3
    assert load_dataset("cifar10", tmp_path, download=False).train_x.shape[0] == 10
    assert hashed == [] and not (isolated_data_env / "verified.json").exists()


def test_verify_false_hashes_and_records_nothing(
    published, hashed: list, isolated_data_env: Path
) -> None:
    spec, root = published
    path = root / "mnist" / GZ[0]
    _rewrite(path, gzip.compress(gzip.decompress(path.read_bytes()), mtime=7))  # not published
    assert _load(spec, root, verify=False).train_x.shape[0] == 4
    assert hashed == [] and not isolated_data_env.exists()
    with pytest.raises(ChecksumError):
        _load(spec, root)


def test_a_folder_under_a_published_file_name_is_refused(published) -> None:
    spec, root = published
    path = root / "mnist" / GZ[2]
    path.unlink()
    path.mkdir()
    with pytest.raises(ChecksumError, match=f"{path}: not a regular file; delete it"):
        _load(spec, root)
