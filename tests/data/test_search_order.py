from __future__ import annotations

import dataclasses
import gzip
import shutil
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from datafiles import MNIST_NAMES, mnist_arrays, remote_files, serve, url_of, write_mnist

from bbdrop.data import (
    SYSTEM_DATA_DIR,
    DatasetNotFoundError,
    default_cache_dir,
    default_system_dir,
    get_dataset_spec,
    load_dataset,
    search_roots,
)


def _roots(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    env = tmp_path / "env"
    monkeypatch.setenv("BBDROP_DATA", str(env))
    return {
        "$BBDROP_DATA": env,
        "user cache": cache,
        "system datasets": tmp_path / "usr-share-datasets",
    }


def _labelled_set(root: Path, label: int) -> None:
    """A small MNIST in ``root/mnist`` whose every training label is ``label``, so that
    the data loaded tells which folder it came from."""
    arrays = mnist_arrays(3, 2, seed=label)
    arrays[MNIST_NAMES[1]][:] = label
    write_mnist(root / "mnist", arrays)


def _load(data_dir: Path | None, system: Path | None, **kwargs):
    kwargs = {"download": False, "verify": False, "progress": False} | kwargs
    return load_dataset("mnist", data_dir, system_dir=system, **kwargs)


def test_roots_are_searched_in_the_documented_order(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    found = search_roots(None, roots["system datasets"])
    assert [(r.path, r.origin) for r in found] == [(p, o) for o, p in roots.items()]


def test_a_named_folder_is_the_only_root(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    found = search_roots(tmp_path / "explicit", roots["system datasets"])
    assert [(r.path, r.origin) for r in found] == [(tmp_path / "explicit", "data_dir argument")]


def test_each_root_wins_over_the_ones_after_it(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    for i, root in enumerate(roots.values()):
        _labelled_set(root, i)
    for i, root in enumerate(roots.values()):
        ds = _load(None, roots["system datasets"])
        assert ds.location == root / "mnist"
        assert ds.train_y.tolist() == [i] * 3
        shutil.rmtree(root / "mnist")
    with pytest.raises(DatasetNotFoundError):
        _load(None, roots["system datasets"])


def test_a_complete_named_folder_is_used(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    for i, root in enumerate(roots.values()):
        _labelled_set(root, i)
    _labelled_set(tmp_path / "explicit", 7)
    ds = _load(tmp_path / "explicit", roots["system datasets"])
    assert ds.location == tmp_path / "explicit" / "mnist" and ds.train_y.tolist() == [7] * 3


def _break_named_folder(explicit: Path, case: str) -> None:
    if case == "data_dir is a file":
        explicit.write_text("not a folder")
    elif case == "3 of 4 files":
        _labelled_set(explicit, 7)
        (explicit / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    elif case == "<data_dir>/mnist is a file":
        explicit.mkdir()
        (explicit / "mnist").write_text("not a folder")
    else:  # "missing"
        pass


NAMED_FOLDER_CASES = ["data_dir is a file", "3 of 4 files", "<data_dir>/mnist is a file", "missing"]


@pytest.mark.parametrize("case", NAMED_FOLDER_CASES)
def test_a_named_folder_is_never_passed_over(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Complete sets everywhere else; the named folder is refused, not skipped."""
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    for i, root in enumerate(roots.values()):
        _labelled_set(root, i)
    explicit = tmp_path / "explicit"
    _break_named_folder(explicit, case)
    with pytest.raises(DatasetNotFoundError) as info:
        _load(explicit, roots["system datasets"])
    first, *rest = str(info.value).splitlines()
    target = explicit / "mnist"
    if case == "data_dir is a file":
        assert first == (
            f"data_dir {explicit} is not a folder; give the folder that holds (or will "
            "hold) mnist/, not a file"
        )
    elif case == "<data_dir>/mnist is a file":
        assert first == (
            f"dataset 'mnist': {target} (data_dir argument) is not a folder; remove or rename "
            "it, the dataset's files go in a folder of that name"
        )
    elif case == "3 of 4 files":
        assert first.startswith(
            f"dataset 'mnist': {target} lacks t10k-labels-idx1-ubyte.gz, and download=False; "
            "place them there"
        )
        assert f"  {target}  (data_dir argument: 3 of 4 files)" in rest
    else:
        assert first.startswith(f"dataset 'mnist': no folder {target}, and download=False;")
    for root in roots.values():  # nothing else was read, and nothing else is named
        assert str(root) not in str(info.value)


@pytest.mark.parametrize("case", ["data_dir is a file", "<data_dir>/mnist is a file"])
def test_a_named_path_that_is_not_a_folder_is_refused_even_with_download(
    tmp_path: Path, case: str
) -> None:
    explicit = tmp_path / "explicit"
    _break_named_folder(explicit, case)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        _load(explicit, None, download=True, mirrors=["http://127.0.0.1:1/never-used/"])
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_the_missing_file_of_a_named_folder_is_downloaded_into_it(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    arrays = mnist_arrays(3, 2, seed=4)
    blobs = {p.name: p.read_bytes() for p in write_mnist(tmp_path / "published", arrays)}
    spec = dataclasses.replace(get_dataset_spec("mnist"), files=remote_files(blobs))
    for root in roots.values():  # complete sets elsewhere must not be used instead
        write_mnist(root / "mnist", arrays)
    before = {p: p.stat().st_mtime_ns for root in roots.values() for p in root.rglob("*")}
    explicit = tmp_path / "explicit"
    _break_named_folder(explicit, "3 of 4 files")
    for name in blobs:  # the three present are the published ones
        if (explicit / "mnist" / name).exists():
            (explicit / "mnist" / name).write_bytes(blobs[name])
    with serve({f"/m/{k}": v for k, v in blobs.items()}) as server:
        ds = load_dataset(
            spec,
            explicit,
            progress=False,
            timeout=5.0,
            mirrors=[url_of(server, "/m/")],
            system_dir=roots["system datasets"],
        )
    assert server.requests == ["/m/t10k-labels-idx1-ubyte.gz"]
    assert ds.location == explicit / "mnist"
    assert (explicit / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes() == blobs[
        "t10k-labels-idx1-ubyte.gz"
    ]
    assert sorted(p.name for p in (explicit / "mnist").iterdir()) == sorted(blobs)
    after = {p: p.stat().st_mtime_ns for root in roots.values() for p in root.rglob("*")}
    assert after == before | {isolated_data_env / "verified.json": ANY}


@pytest.mark.parametrize("which", ["$BBDROP_DATA", "user cache", "system datasets"])
@pytest.mark.parametrize("what", ["root", "dataset folder"])
def test_a_searched_path_that_is_not_a_folder_is_an_error(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch, which: str, what: str
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    for origin, root in roots.items():
        if origin != which:
            _labelled_set(root, 0)
    # The roots before ``which`` must not hold the data, or the search never reaches it.
    for origin in list(roots)[: list(roots).index(which)]:
        shutil.rmtree(roots[origin] / "mnist")
    broken = roots[which] if what == "root" else roots[which] / "mnist"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("not a folder")
    with pytest.raises(DatasetNotFoundError) as info:
        _load(None, roots["system datasets"])
    first = str(info.value).splitlines()[0]
    assert f"{broken} " in first and "is not a folder;" in first
    fix = {
        "$BBDROP_DATA": "point $BBDROP_DATA at a folder, or unset it",
        "user cache": "set $XDG_CACHE_HOME to another folder",
        "system datasets": "pass system_dir=None",
    }
    assert (fix[which] if what == "root" else "remove or rename it") in first


def test_an_incomplete_folder_in_the_search_order_is_passed_over(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    _labelled_set(roots["$BBDROP_DATA"], 0)
    (roots["$BBDROP_DATA"] / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    _labelled_set(roots["user cache"], 1)
    ds = _load(None, None)
    assert ds.location == roots["user cache"] / "mnist" and ds.train_y.tolist() == [1] * 3
    shutil.rmtree(roots["user cache"] / "mnist")
    with pytest.raises(DatasetNotFoundError) as info:
        _load(None, None)
    assert f"  {roots['$BBDROP_DATA'] / 'mnist'}  ($BBDROP_DATA: 3 of 4 files)" in str(info.value)


def test_cache_dir_follows_xdg_and_falls_back_to_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "bbdrop"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value in ("", "relative/path"):  # the XDG spec: ignore empty and relative values
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert default_cache_dir() == tmp_path / "home" / ".cache" / "bbdrop"


def test_empty_env_var_and_no_system_dir_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BBDROP_DATA", "")
    assert [r.origin for r in search_roots(None, None)] == ["user cache"]


def test_the_default_system_folder_follows_its_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$BBDROP_SYSTEM_DATA, read at each call, replaces /usr/share/datasets when no
    system_dir is passed; empty, no system folder is searched; system_dir passed wins."""
    monkeypatch.delenv("BBDROP_SYSTEM_DATA", raising=False)
    assert default_system_dir() == SYSTEM_DATA_DIR == Path("/usr/share/datasets")
    assert search_roots()[-1] == (SYSTEM_DATA_DIR, "system datasets")
    monkeypatch.setenv("BBDROP_SYSTEM_DATA", str(tmp_path / "sys"))
    assert search_roots()[-1] == (tmp_path / "sys", "system datasets")
    assert search_roots(None, tmp_path / "other")[-1].path == tmp_path / "other"
    assert [r.origin for r in search_roots(None, None)] == ["user cache"]
    _labelled_set(tmp_path / "sys", 7)
    ds = load_dataset("mnist", download=False, verify=False, progress=False)
    assert ds.location == tmp_path / "sys" / "mnist" and set(ds.train_y.tolist()) == {7}
    monkeypatch.setenv("BBDROP_SYSTEM_DATA", "")
    assert default_system_dir() is None
    assert [r.origin for r in search_roots()] == ["user cache"]
    with pytest.raises(DatasetNotFoundError, match="in the 1 folder searched"):
        load_dataset("mnist", download=False, verify=False, progress=False)


def test_uncompressed_idx_files_are_accepted(tmp_path: Path) -> None:
    arrays = mnist_arrays(4, 3, seed=5)
    write_mnist(tmp_path / "mnist", arrays, gz=False)
    ds = load_dataset("mnist", tmp_path, download=False, verify=False)
    expected = torch.from_numpy(arrays[MNIST_NAMES[0]]).float().div(255).unsqueeze(1)
    torch.testing.assert_close(ds.train_x, expected, rtol=0, atol=0)


def test_debian_layout_is_found_in_the_system_dir(tmp_path: Path) -> None:
    """Debian's dataset-fashion-mnist: /usr/share/datasets/fashion-mnist/<published>.gz,
    gzip headers without a file name (they were rewritten by strip-nondeterminism)."""
    system = tmp_path / "usr" / "share" / "datasets"
    folder = system / "fashion-mnist"
    folder.mkdir(parents=True)
    arrays = mnist_arrays(5, 4, seed=9)
    for path in write_mnist(tmp_path / "staging", arrays):
        raw = gzip.decompress(path.read_bytes())
        (folder / path.name).write_bytes(gzip.compress(raw, mtime=1591347949))
    ds = load_dataset("fashion-mnist", download=False, system_dir=system, verify=False)
    assert ds.location == folder
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays[MNIST_NAMES[3]])


def test_not_found_error_names_every_folder_the_files_and_urls(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", download=False, system_dir=tmp_path / "sys")
    message = str(info.value)
    first = message.splitlines()[0]
    target = default_cache_dir() / "mnist"
    assert first == (
        "dataset 'mnist': no complete copy in the 2 folders searched, and download=False; "
        f"place the files below in {target}, or allow downloads (download=True; "
        "data.download=true in a run's settings)"
    )
    assert f"  {target}  (user cache: no folder)" in message
    assert f"  {tmp_path / 'sys' / 'mnist'}  (system datasets: no folder)" in message
    assert f"place these files in {target}" in message
    for name in MNIST_NAMES:
        assert f"  {name}.gz  " in message
        assert f"https://ossci-datasets.s3.amazonaws.com/mnist/{name}.gz" in message
    assert not default_cache_dir().exists()  # download=False creates nothing


def test_not_found_in_a_named_folder_names_only_that_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", tmp_path / "d", download=False, system_dir=tmp_path / "sys")
    message = str(info.value)
    assert message.splitlines()[0].startswith(
        f"dataset 'mnist': no folder {tmp_path / 'd' / 'mnist'}, and download=False; create it"
    )
    assert str(tmp_path / "sys") not in message and str(default_cache_dir()) not in message
    assert f"place these files in {tmp_path / 'd' / 'mnist'}" in message
    assert not (tmp_path / "d").exists()  # download=False creates nothing
