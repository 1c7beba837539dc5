from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import MNIST_NAMES, mnist_arrays, write_mnist

from bbdrop.data import (
    DatasetNotFoundError,
    default_cache_dir,
    load_dataset,
    search_roots,
)


def _roots(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    env = tmp_path / "env"
    monkeypatch.setenv("BBDROP_DATA", str(env))
    return {
        "data_dir argument": tmp_path / "explicit",
        "$BBDROP_DATA": env,
        "user cache": cache,
        "system datasets": tmp_path / "usr-share-datasets",
    }


def test_roots_are_searched_in_the_documented_order(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    found = search_roots(roots["data_dir argument"], roots["system datasets"])
    assert [(r.path, r.origin) for r in found] == [(p, o) for o, p in roots.items()]


def test_each_root_wins_over_the_ones_after_it(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    # Root i holds a set whose every training label is i, so the data tells the root.
    for i, root in enumerate(roots.values()):
        arrays = mnist_arrays(3, 2, seed=i)
        arrays[MNIST_NAMES[1]][:] = i
        write_mnist(root / "mnist", arrays)
    for i, root in enumerate(roots.values()):
        ds = load_dataset(
            "mnist", roots["data_dir argument"], download=False, system_dir=roots["system datasets"]
        )
        assert ds.location == root / "mnist"
        assert ds.train_y.tolist() == [i] * 3
        shutil.rmtree(root / "mnist")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", roots["data_dir argument"], download=False, system_dir=None)


def test_an_incomplete_folder_is_passed_over(
    tmp_path: Path, isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = _roots(tmp_path, isolated_data_env, monkeypatch)
    write_mnist(roots["data_dir argument"] / "mnist", mnist_arrays(3, 2, seed=0))
    (roots["data_dir argument"] / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    write_mnist(roots["user cache"] / "mnist", mnist_arrays(3, 2, seed=1))
    ds = load_dataset("mnist", roots["data_dir argument"], download=False, system_dir=None)
    assert ds.location == roots["user cache"] / "mnist"


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


def test_uncompressed_idx_files_are_accepted(tmp_path: Path) -> None:
    arrays = mnist_arrays(4, 3, seed=5)
    write_mnist(tmp_path / "mnist", arrays, gz=False)
    ds = load_dataset("mnist", tmp_path, download=False, system_dir=None)
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
    ds = load_dataset("fashion-mnist", tmp_path / "nothing-here", download=False, system_dir=system)
    assert ds.location == folder
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays[MNIST_NAMES[3]])


def test_not_found_error_names_every_folder_the_files_and_urls(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", tmp_path / "d", download=False, system_dir=tmp_path / "sys")
    message = str(info.value)
    for folder in (tmp_path / "d" / "mnist", tmp_path / "sys" / "mnist", default_cache_dir()):
        assert str(folder) in message
    assert f"place these files in {tmp_path / 'd' / 'mnist'}" in message
    for name in MNIST_NAMES:
        assert f"  {name}.gz  " in message
        assert f"https://ossci-datasets.s3.amazonaws.com/mnist/{name}.gz" in message
    assert "download=False" in message
    assert not (tmp_path / "d").exists()  # download=False creates nothing
