from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datafiles import (
    MNIST_NAMES,
    closed_port,
    mnist_arrays,
    remote_files,
    serve,
    silent_listener,
    url_of,
    write_cifar,
    write_mnist,
)

from bbdrop.data import (
    ChecksumError,
    DatasetNotFoundError,
    RemoteFile,
    download_file,
    get_dataset_spec,
    load_dataset,
)
from bbdrop.files import remove_stale_parts

TIMEOUT = 5.0


@pytest.fixture
def mnist_blobs(tmp_path: Path) -> dict[str, bytes]:
    """The four gzipped IDX files of a 6 + 4 image MNIST, by published name."""
    paths = write_mnist(tmp_path / "source", mnist_arrays(6, 4, seed=3))
    return {p.name: p.read_bytes() for p in paths}


def _spec(blobs: dict[str, bytes], mirrors: tuple[str, ...]):
    return dataclasses.replace(
        get_dataset_spec("mnist"), files=remote_files(blobs), mirrors=mirrors
    )


def _load(spec, data_dir: Path, **kwargs):
    kwargs = {"progress": False, "timeout": TIMEOUT, "system_dir": None} | kwargs
    return load_dataset(spec, data_dir, **kwargs)


def test_download_leaves_exactly_the_verified_files(
    tmp_path: Path, mnist_blobs: dict[str, bytes]
) -> None:
    with serve({f"/mnist/{k}": v for k, v in mnist_blobs.items()}) as server:
        ds = _load(_spec(mnist_blobs, (url_of(server, "/mnist/"),)), tmp_path / "root")
    target = tmp_path / "root" / "mnist"
    assert ds.location == target
    assert sorted(p.name for p in target.iterdir()) == sorted(mnist_blobs)
    for name, blob in mnist_blobs.items():
        assert (target / name).read_bytes() == blob
    assert ds.train_x.shape == (6, 1, 28, 28) and ds.test_y.shape == (4,)
    assert sorted(server.requests) == sorted(f"/mnist/{k}" for k in mnist_blobs)


def test_files_already_there_are_not_fetched_again(
    tmp_path: Path, mnist_blobs: dict[str, bytes]
) -> None:
    target = tmp_path / "root" / "mnist"
    target.mkdir(parents=True)
    have = list(mnist_blobs)[:2]
    for name in have:
        (target / name).write_bytes(mnist_blobs[name])
    with serve({f"/{k}": v for k, v in mnist_blobs.items()}) as server:
        _load(_spec(mnist_blobs, (url_of(server),)), tmp_path / "root")
    assert sorted(server.requests) == sorted(f"/{k}" for k in mnist_blobs if k not in have)


@pytest.mark.parametrize("first", ["404", "corrupt", "closed port"])
def test_next_mirror_is_tried_when_one_fails(
    tmp_path: Path, mnist_blobs: dict[str, bytes], first: str
) -> None:
    bad = {f"/bad/{k}": v[:-1] + bytes([v[-1] ^ 1]) for k, v in mnist_blobs.items()}
    good = {f"/good/{k}": v for k, v in mnist_blobs.items()}
    with serve(good | (bad if first == "corrupt" else {})) as server:
        first_url = (
            f"http://127.0.0.1:{closed_port()}/"
            if first == "closed port"
            else url_of(server, "/bad/")
        )
        ds = _load(_spec(mnist_blobs, (first_url, url_of(server, "/good/"))), tmp_path)
    assert sorted(p.name for p in ds.location.iterdir()) == sorted(mnist_blobs)


@pytest.mark.parametrize("corruption", ["flipped byte", "one byte short", "one byte long"])
def test_corrupt_download_is_rejected_and_leaves_nothing(
    tmp_path: Path, mnist_blobs: dict[str, bytes], corruption: str
) -> None:
    def corrupt(b: bytes) -> bytes:
        if corruption == "flipped byte":
            return b[:10] + bytes([b[10] ^ 0xFF]) + b[11:]
        return b[:-1] if corruption == "one byte short" else b + b"\x00"

    root = tmp_path / "root"
    target = root / "mnist"
    target.mkdir(parents=True)
    bystander = target / "notes.txt"
    bystander.write_text("mine")
    before = bystander.stat()
    with serve({f"/{k}": corrupt(v) for k, v in mnist_blobs.items()}) as server:
        with pytest.raises(ChecksumError) as info:
            _load(_spec(mnist_blobs, (url_of(server),)), root)
    first = next(iter(mnist_blobs))
    assert first in str(info.value) and str(target) in str(info.value)
    assert ("SHA-256 mismatch" if corruption == "flipped byte" else "bytes") in str(info.value)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]  # no temp, no partial file
    after = bystander.stat()
    assert bystander.read_text() == "mine" and after.st_mtime_ns == before.st_mtime_ns


def test_failed_download_removes_the_folders_it_created(
    tmp_path: Path, mnist_blobs: dict[str, bytes]
) -> None:
    with serve({f"/{k}": b"not the file" for k in mnist_blobs}) as server:
        with pytest.raises(ChecksumError):
            _load(_spec(mnist_blobs, (url_of(server),)), tmp_path / "new" / "root")
    assert (
        list(tmp_path.iterdir()) == [tmp_path / "source", tmp_path / "xdg-cache"]
        or not (tmp_path / "new").exists()
    )
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("how", ["404", "closed port"])
def test_unreachable_mirrors_give_the_offline_error(
    tmp_path: Path, mnist_blobs: dict[str, bytes], how: str
) -> None:
    with serve({}) as server:
        mirror = url_of(server) if how == "404" else f"http://127.0.0.1:{closed_port()}/"
        with pytest.raises(DatasetNotFoundError) as info:
            _load(_spec(mnist_blobs, (mirror,)), tmp_path / "root")
    assert not isinstance(info.value, ChecksumError)
    message = str(info.value)
    assert ("HTTP 404" if how == "404" else "refused") in message
    assert f"place these files in {tmp_path / 'root' / 'mnist'}" in message
    for name in mnist_blobs:
        assert f"  {name}  " in message and f"{mirror}{name}" in message
    assert not (tmp_path / "root").exists()


def test_a_silent_server_times_out(tmp_path: Path) -> None:
    remote = RemoteFile("f.bin", hashlib.sha256(b"x").hexdigest(), 1)
    with silent_listener() as port:
        start = time.monotonic()
        with pytest.raises(DatasetNotFoundError, match="timed out"):
            download_file(remote, [f"http://127.0.0.1:{port}/"], tmp_path, timeout=0.3)
        assert time.monotonic() - start < 3
    assert list(tmp_path.iterdir()) == []


def test_connection_dropped_mid_file_leaves_nothing(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 64
    remote = RemoteFile("f.bin", hashlib.sha256(blob).hexdigest(), len(blob))
    # The server announces the full length but sends half the bytes, then closes.
    with serve({"/f.bin": blob[: len(blob) // 2]}, lengths={"/f.bin": len(blob)}) as server:
        with pytest.raises(
            DatasetNotFoundError, match="connection closed after 8192 of 16384 bytes"
        ):
            download_file(remote, [url_of(server)], tmp_path, progress=False, timeout=TIMEOUT)
    assert list(tmp_path.iterdir()) == []


def test_size_is_optional_and_sha256_still_checked(tmp_path: Path) -> None:
    blob = b"payload" * 100
    with serve({"/p": blob}) as server:
        ok = RemoteFile("p", hashlib.sha256(blob).hexdigest())
        assert download_file(ok, [url_of(server)], tmp_path, progress=False).read_bytes() == blob
        (tmp_path / "p").unlink()
        wrong = RemoteFile("p", hashlib.sha256(b"other").hexdigest())
        with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
            download_file(wrong, [url_of(server)], tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_can_be_shown_or_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blob = b"z" * 5000
    remote = RemoteFile("bar.bin", hashlib.sha256(blob).hexdigest(), len(blob))
    with serve({"/bar.bin": blob}) as server:
        (tmp_path / "a").mkdir()
        download_file(remote, [url_of(server)], tmp_path / "a", progress=False)
        assert capsys.readouterr().err == ""
        (tmp_path / "b").mkdir()
        download_file(remote, [url_of(server)], tmp_path / "b", progress=True)
        assert "bar.bin" in capsys.readouterr().err


def test_cifar_archive_downloads_and_reads(tmp_path: Path) -> None:
    path, expected = write_cifar(tmp_path / "src", cifar100=False, n=2, archive=True)
    blobs = {"cifar-10-python.tar.gz": path.read_bytes()}
    files = tuple(
        dataclasses.replace(f, alternatives=("cifar-10-batches-py",)) for f in remote_files(blobs)
    )
    with serve({"/kriz/cifar-10-python.tar.gz": blobs["cifar-10-python.tar.gz"]}) as server:
        spec = dataclasses.replace(
            get_dataset_spec("cifar10"), files=files, mirrors=(url_of(server, "/kriz/"),)
        )
        ds = _load(spec, tmp_path / "root")
    assert [p.name for p in ds.location.iterdir()] == ["cifar-10-python.tar.gz"]
    assert ds.train_x.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(ds.test_y.numpy(), expected["test_y"])


def test_mirrors_argument_overrides_the_spec(tmp_path: Path, mnist_blobs: dict[str, bytes]) -> None:
    spec = _spec(mnist_blobs, ("http://127.0.0.1:1/never-used/",))
    with serve({f"/m/{k}": v for k, v in mnist_blobs.items()}) as server:
        ds = _load(spec, tmp_path, mirrors=[url_of(server, "/m")])
    assert sorted(p.name for p in ds.location.iterdir()) == sorted(mnist_blobs)
    with pytest.raises(ValueError, match="at least one"):
        _load(spec, tmp_path / "x", mirrors=[])


def test_every_registered_file_names_a_checksum_and_size() -> None:
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
        spec = get_dataset_spec(name)
        assert spec.files and spec.mirrors
        for f in spec.files:
            assert f.size is not None and f.size > 4000
    assert get_dataset_spec("mnist").mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert "yann.lecun.com" in get_dataset_spec("mnist").mirrors[1]
    assert [f.name for f in get_dataset_spec("mnist").files] == [f"{n}.gz" for n in MNIST_NAMES]


def test_unwritable_target_gives_the_offline_error(
    tmp_path: Path, mnist_blobs: dict[str, bytes]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetNotFoundError) as info:
        _load(_spec(mnist_blobs, ("http://127.0.0.1:1/",)), blocker / "data")
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"dataset 'mnist': could not create {blocker / 'data' / 'mnist'} (")
    assert first.endswith("or choose a folder that can be written (data_dir, $BBDROP_DATA)")
    assert blocker.read_text() == "not a folder"


def test_download_errors_say_what_to_do_on_their_first_line(
    tmp_path: Path, mnist_blobs: dict[str, bytes]
) -> None:
    target = tmp_path / "root" / "mnist"
    with serve({}) as server:
        with pytest.raises(DatasetNotFoundError) as info:
            _load(_spec(mnist_blobs, (url_of(server),)), tmp_path / "root")
    first = str(info.value).splitlines()[0]
    assert first == (  # the server is up but has no such file: it says so, not "unreachable"
        f"dataset 'mnist': could not download {MNIST_NAMES[0]}.gz into {target}: the mirror "
        "answered HTTP 404 (below); check the network connection and the mirrors, or place "
        "the published file there yourself"
    )
    with serve({f"/{k}": b"wrong" for k in mnist_blobs}) as server:
        with pytest.raises(ChecksumError) as info:
            _load(_spec(mnist_blobs, (url_of(server),)), tmp_path / "root")
    first = str(info.value).splitlines()[0]
    assert first.startswith(
        f"dataset 'mnist': could not download {MNIST_NAMES[0]}.gz into {target}: the "
        "mirrors served wrong bytes"
    )
    assert first.endswith("try again later, or place the published file there yourself")


def _part(folder: Path, name: str, pid: int) -> Path:
    path = folder / f".{name}.{pid}.0123abcd.part"
    path.write_bytes(b"half a file")
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


def test_parts_left_by_dead_processes_are_removed(
    tmp_path: Path, mnist_blobs: dict[str, bytes]
) -> None:
    name = next(iter(mnist_blobs))
    target = tmp_path / "root" / "mnist"
    target.mkdir(parents=True)
    dead = _part(target, name, _dead_pid())
    live = _part(target, name, os.getpid())
    other_file = _part(target, "t10k-labels-idx1-ubyte.gz", _dead_pid())  # not downloaded now
    for other in mnist_blobs:
        if other != name:
            (target / other).write_bytes(mnist_blobs[other])
    unrelated = target / f".{name}.notes"
    unrelated.write_text("mine")
    with serve({f"/{k}": v for k, v in mnist_blobs.items()}) as server:
        _load(_spec(mnist_blobs, (url_of(server),)), tmp_path / "root")
    assert not dead.exists()
    assert live.read_bytes() == b"half a file"
    assert other_file.exists() and unrelated.read_text() == "mine"
    assert (target / name).read_bytes() == mnist_blobs[name]


def test_a_part_of_a_process_that_cannot_be_signalled_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = _part(tmp_path, "f.bin", 1)  # pid 1 always exists
    dead = _part(tmp_path, "f.bin", _dead_pid())

    def kill(pid: int, sig: int) -> None:
        if pid == 1:
            raise PermissionError(1, "Operation not permitted")
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(os, "kill", kill)
    assert remove_stale_parts(tmp_path, "f.bin") == [dead]
    assert kept.exists() and not dead.exists()


def test_the_file_is_synced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = b"data" * 1000
    remote = RemoteFile("f.bin", hashlib.sha256(blob).hexdigest(), len(blob))
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with serve({"/f.bin": blob}) as server:
        download_file(remote, [url_of(server)], tmp_path, progress=False, timeout=TIMEOUT)
    expected = ["fsync file", "rename"] + (["fsync folder"] if hasattr(os, "O_DIRECTORY") else [])
    assert events == expected
    assert (tmp_path / "f.bin").read_bytes() == blob
