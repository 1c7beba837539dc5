from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
from datafiles import cifar_batch, py2_pickle, tar_gz, write_cifar

from bbdrop.data import parse_cifar_batch, read_cifar10, read_cifar100


def _assert_splits(splits, expected: dict[str, np.ndarray]) -> None:
    for key, want in expected.items():
        got = getattr(splits, key)
        np.testing.assert_array_equal(got.numpy(), want, err_msg=key)
    assert splits.train_x.dtype.is_floating_point is False
    assert str(splits.train_y.dtype) == "torch.int64"


@pytest.mark.parametrize("archive", [False, True])
def test_cifar10_round_trips_from_folder_and_archive(tmp_path: Path, archive: bool) -> None:
    path, expected = write_cifar(tmp_path, cifar100=False, n=3, archive=archive)
    splits = read_cifar10(path)
    assert splits.train_x.shape == (15, 3, 32, 32) and splits.test_x.shape == (3, 3, 32, 32)
    _assert_splits(splits, expected)


@pytest.mark.parametrize("archive", [False, True])
def test_cifar100_round_trips_with_fine_labels(tmp_path: Path, archive: bool) -> None:
    path, expected = write_cifar(tmp_path, cifar100=True, n=4, archive=archive)
    splits = read_cifar100(path)
    assert splits.train_x.shape == (8, 3, 32, 32) and splits.test_x.shape == (4, 3, 32, 32)
    _assert_splits(splits, expected)


def test_folder_may_be_given_by_its_parent(tmp_path: Path) -> None:
    path, expected = write_cifar(tmp_path, cifar100=False, n=2)
    _assert_splits(read_cifar10(path.parent), expected)


def test_rows_are_red_green_blue_planes_in_row_major_order() -> None:
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, 0 * 1024 + 5 * 32 + 7] = 11  # red, row 5, column 7
    data[0, 1 * 1024 + 0 * 32 + 31] = 22  # green, row 0, column 31
    data[0, 2 * 1024 + 31 * 32 + 0] = 33  # blue, row 31, column 0
    x, y = parse_cifar_batch(py2_pickle({"data": data, "labels": [9]}))
    assert x[0, 0, 5, 7] == 11 and x[0, 1, 0, 31] == 22 and x[0, 2, 31, 0] == 33
    assert int(x.sum()) == 66 and y.tolist() == [9]


def test_python3_pickles_load_too() -> None:
    batch, images, labels = cifar_batch(3, 10, seed=1)
    blob = pickle.dumps({k.encode(): v for k, v in batch.items()}, protocol=4)
    x, y = parse_cifar_batch(blob)
    np.testing.assert_array_equal(x.numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)


def _batch(**changes: object) -> dict[str, object]:
    batch, _, _ = cifar_batch(4, 10, seed=2)
    batch.update(changes)
    return {k: v for k, v in batch.items() if v is not None}


BAD_BATCHES = {
    "no labels": (py2_pickle(_batch(labels=None)), r"missing key b'labels'"),
    "no data": (py2_pickle(_batch(data=None)), r"missing key b'data'"),
    "wrong width": (
        py2_pickle(_batch(data=np.zeros((4, 3071), np.uint8))),
        r"uint8 array of shape \(N, 3072\), got uint8 array of shape \(4, 3071\)",
    ),
    "wrong dtype": (py2_pickle(_batch(data=np.zeros((4, 3072), np.int16))), "got int16 array"),
    "data not an array": (py2_pickle(_batch(data=[1, 2])), "got list"),
    "label count": (py2_pickle(_batch(labels=[1, 2, 3])), r"shape \(3,\), expected \(4,\)"),
    "label range": (py2_pickle(_batch(labels=[0, 1, 2, 10])), r"values in \[0, 10\], expected"),
    "labels not ints": (py2_pickle(_batch(labels=["a", "b", "c", "d"])), "not a list of integers"),
    "not a dict": (py2_pickle([1, 2, 3]), "must be a dict, got list"),
    "garbage": (b"this is not a pickle", "not a readable CIFAR pickle"),
    "truncated": (py2_pickle(_batch())[:-50], "not a readable CIFAR pickle"),
    "foreign global": (
        pickle.dumps({b"data": collections.OrderedDict()}),
        "collections.OrderedDict is not allowed",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batches_raise_value_error_naming_source_and_problem(case: str) -> None:
    blob, message = BAD_BATCHES[case]
    with pytest.raises(ValueError, match=message) as info:
        parse_cifar_batch(blob, "the/batch")
    assert str(info.value).startswith("the/batch: ")


class _RunsCode:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran() -> None:
    _RunsCode.ran = True


def test_a_pickle_cannot_call_functions() -> None:
    with pytest.raises(ValueError, match="is not allowed in a CIFAR batch"):
        parse_cifar_batch(pickle.dumps({b"data": _RunsCode()}))
    assert not _RunsCode.ran
    pickle.loads(pickle.dumps(_RunsCode()))  # the test's own control: it does run
    assert _RunsCode.ran


def test_bad_file_inside_folder_is_named(tmp_path: Path) -> None:
    path, _ = write_cifar(tmp_path, cifar100=False, n=2)
    (path / "data_batch_3").write_bytes(py2_pickle(_batch(labels=None)))
    with pytest.raises(ValueError, match=r"data_batch_3: missing key b'labels'"):
        read_cifar10(path)


def test_bad_member_inside_archive_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "c.tar.gz"
    good = py2_pickle(_batch(data=np.zeros((4, 3072), np.uint8)))
    members = {f"cifar-100-python/{n}": good for n in ("train", "meta")}
    members["cifar-100-python/test"] = py2_pickle(_batch(data=np.zeros((4, 3072), np.uint8)))
    archive.write_bytes(tar_gz(members))
    with pytest.raises(
        ValueError, match=r"c\.tar\.gz:cifar-100-python/train: missing key b'fine_labels'"
    ):
        read_cifar100(archive)


def test_missing_batch_file_is_named(tmp_path: Path) -> None:
    path, _ = write_cifar(tmp_path, cifar100=False, n=2)
    (path / "test_batch").unlink()
    with pytest.raises(ValueError, match=r"missing batch file 'test_batch'"):
        read_cifar10(path)


def test_archive_without_a_member_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(tar_gz({"cifar-10-batches-py/data_batch_1": py2_pickle(_batch())}))
    with pytest.raises(ValueError, match=r"archive lacks \['cifar-10-batches-py/data_batch_2'"):
        read_cifar10(archive)


def test_truncated_archive_is_a_value_error(tmp_path: Path) -> None:
    path, _ = write_cifar(tmp_path, cifar100=False, n=2, archive=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated archive") as info:
        read_cifar10(path)
    assert str(path) in str(info.value)
