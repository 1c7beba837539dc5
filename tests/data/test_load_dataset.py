from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import MNIST_NAMES, mnist_arrays, write_cifar, write_mnist

from bbdrop.data import (
    Dataset,
    DatasetSpec,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    read_digits,
    register_dataset,
)
from bbdrop.data.datasets import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

EXPECTED = {
    "digits": (10, (1, 8, 8)),
    "mnist": (10, (1, 28, 28)),
    "fashion-mnist": (10, (1, 28, 28)),
    "cifar10": (10, (3, 32, 32)),
    "cifar100": (100, (3, 32, 32)),
}


def test_registry_lists_the_five_datasets() -> None:
    assert list_datasets() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_shapes_and_classes(name: str) -> None:
    spec = get_dataset_spec(name)
    assert (spec.num_classes, spec.input_shape) == EXPECTED[name]
    assert spec.augment == name.startswith("cifar")


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown dataset 'svhn'; available: cifar10, cifar100, digits"
    ):
        load_dataset("svhn")


def test_registering_twice_or_a_non_spec_fails() -> None:
    with pytest.raises(ValueError, match="'mnist' is already registered"):
        register_dataset(get_dataset_spec("mnist"))
    with pytest.raises(TypeError, match="expects a DatasetSpec"):
        register_dataset("mnist")  # type: ignore[arg-type]


def test_spec_validation() -> None:
    spec = get_dataset_spec("mnist")
    with pytest.raises(ValueError, match="no mirror"):
        dataclasses.replace(spec, mirrors=())
    with pytest.raises(ValueError, match="both mean and std"):
        dataclasses.replace(spec, mean=(0.5,))


def test_digits_is_the_default_and_a_fixed_stratified_split() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_dataset()
    assert ds.name == "digits" and ds.location is None
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    np.testing.assert_allclose(ds.train_x.flatten(1).numpy(), x_tr / 16, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ds.test_x.flatten(1).numpy(), x_te / 16, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ds.train_y.numpy(), y_tr)
    # Stratified: each class has 20% of its examples in the test set, +-1.
    per_class = np.bincount(y)
    assert (np.abs(np.bincount(y_te) - 0.2 * per_class) <= 1).all()
    again = read_digits()
    assert torch.equal(again.test_y, ds.test_y)


def test_mnist_pixels_are_scaled_to_unit_interval(tmp_path: Path) -> None:
    arrays = mnist_arrays(5, 3, seed=2)
    arrays[MNIST_NAMES[0]][0, 0, :2] = (0, 255)
    write_mnist(tmp_path / "mnist", arrays)
    ds = load_dataset("mnist", tmp_path, download=False, verify=False)
    raw = torch.from_numpy(arrays[MNIST_NAMES[0]]).unsqueeze(1)
    torch.testing.assert_close(ds.train_x, raw.float() / 255, rtol=0, atol=0)
    assert ds.train_x[0, 0, 0, 0] == 0 and ds.train_x[0, 0, 0, 1] == 1
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays[MNIST_NAMES[3]])
    assert ds.test_y.dtype == torch.int64 and ds.mean is None and ds.train_transform is None


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [("cifar10", CIFAR10_MEAN, CIFAR10_STD), ("cifar100", CIFAR100_MEAN, CIFAR100_STD)],
)
@pytest.mark.parametrize("archive", [False, True])
def test_cifar_is_normalised_per_channel(
    tmp_path: Path, name: str, mean: tuple, std: tuple, archive: bool
) -> None:
    _, expected = write_cifar(tmp_path / name, cifar100=name == "cifar100", n=3, archive=archive)
    ds = load_dataset(name, tmp_path, download=False, verify=False)
    for split in ("train", "test"):
        raw = torch.from_numpy(expected[f"{split}_x"]).double() / 255
        want = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(getattr(ds, f"{split}_x").double(), want, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(getattr(ds, f"{split}_y").numpy(), expected[f"{split}_y"])
    assert ds.train_transform is not None and ds.num_classes == (100 if name == "cifar100" else 10)


def test_the_extracted_folder_is_preferred_to_the_archive(tmp_path: Path) -> None:
    folder, expected = write_cifar(tmp_path / "cifar10", cifar100=False, n=2)
    archive, _ = write_cifar(tmp_path / "other", cifar100=False, n=3, archive=True)
    archive.rename(tmp_path / "cifar10" / archive.name)
    ds = load_dataset("cifar10", tmp_path, download=False, verify=False)
    assert ds.train_x.shape[0] == 10 and folder.is_dir()
    np.testing.assert_array_equal(ds.test_y.numpy(), expected["test_y"])


def test_wrong_image_size_for_the_spec_is_a_value_error(tmp_path: Path) -> None:
    write_mnist(tmp_path / "mnist", mnist_arrays(3, 2, seed=0, side=14))
    with pytest.raises(
        ValueError,
        match=r"train images are torch.uint8 \(3, 1, 14, 14\), expected uint8 \(N, 1, 28, 28\)",
    ):
        load_dataset("mnist", tmp_path, download=False, verify=False)


def test_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    arrays = mnist_arrays(3, 2, seed=0)
    arrays[MNIST_NAMES[1]] = arrays[MNIST_NAMES[1]][:2]
    write_mnist(tmp_path / "mnist", arrays)
    with pytest.raises(ValueError, match="2 labels for the 3 images"):
        load_dataset("mnist", tmp_path, download=False, verify=False)


def test_batches_from_a_dataset(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar10", cifar100=False, n=4)
    ds = load_dataset("cifar10", tmp_path, download=False, verify=False).to("cpu")
    train = ds.train_batches(7, torch.Generator().manual_seed(0))
    seen = torch.cat([yb for _, yb in train])
    assert len(train) == 3 and sorted(seen.tolist()) == sorted(ds.train_y.tolist())
    xb, _ = next(iter(train))
    assert xb.shape == (7, 3, 32, 32)
    test = ds.test_batches(3)
    assert torch.equal(torch.cat([xb for xb, _ in test]), ds.test_x)


def test_a_custom_spec_can_be_loaded_without_registering() -> None:
    def read(paths):
        return read_digits()

    spec = DatasetSpec("tiny", 10, (1, 8, 8), read, pixel_max=16.0)
    assert load_dataset(spec).test_x.shape == (360, 1, 8, 8)
    assert "tiny" not in list_datasets()


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_split_on_disk_is_refused(tmp_path: Path, split: str) -> None:
    arrays = mnist_arrays(0 if split == "train" else 3, 0 if split == "test" else 2, seed=0)
    write_mnist(tmp_path / "mnist", arrays)
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", tmp_path, download=False, verify=False)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"dataset 'mnist' in {tmp_path / 'mnist'}: the {split} split has 0")
    assert "replace the files" in first


def test_an_empty_split_from_a_custom_reader_is_refused() -> None:
    def read(paths):
        s = read_digits()
        return s._replace(test_x=s.test_x[:0], test_y=s.test_y[:0])

    spec = DatasetSpec("tiny", 10, (1, 8, 8), read, pixel_max=16.0)
    with pytest.raises(ValueError, match="dataset 'tiny': the test split has 0 examples; check"):
        load_dataset(spec)


def _tensors(n_train: int = 4, n_test: int = 2) -> dict[str, torch.Tensor]:
    return {
        "train_x": torch.rand(n_train, 1, 8, 8),
        "train_y": torch.arange(n_train) % 3,
        "test_x": torch.rand(n_test, 1, 8, 8),
        "test_y": torch.arange(n_test) % 3,
    }


def test_from_tensors_accepts_a_well_formed_dataset() -> None:
    ds = Dataset.from_tensors(**_tensors(), num_classes=3)
    assert ds.input_shape == (1, 8, 8) and ds.train_x.shape[0] == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_x": torch.rand(0, 1, 8, 8), "train_y": torch.zeros(0, dtype=torch.int64)},
         "dataset 'tensors': train split has 0 examples; give at least one"),
        ({"test_x": torch.rand(0, 1, 8, 8), "test_y": torch.zeros(0, dtype=torch.int64)},
         "test split has 0 examples"),
        ({"train_y": torch.zeros(3, dtype=torch.int64)},
         r"train_x has 4 examples but train_y has shape \(3,\); give one label per example"),
        ({"test_y": torch.zeros(2, 1, dtype=torch.int64)}, r"test_y has shape \(2, 1\)"),
        ({"train_y": torch.zeros(4, dtype=torch.int32)},
         "train_y is torch.int32; labels must be int64"),
        ({"train_y": torch.zeros(4)}, "train_y is torch.float32; labels must be int64"),
        ({"test_y": torch.tensor([0, 3])}, r"test_y spans \[0, 3\], outside \[0, 3\)"),
        ({"train_y": torch.tensor([0, -1, 1, 2])}, r"train_y spans \[-1, 2\]"),
        ({"train_x": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)},
         "train_x is torch.uint8; inputs must be floating point"),
        ({"test_x": torch.zeros(2, 1, 8, 8, dtype=torch.int64)}, "test_x is torch.int64"),
        ({"test_x": torch.rand(2, 1, 4, 4)}, r"test_x examples are \(1, 4, 4\)"),
    ],
)  # fmt: skip
def test_from_tensors_refuses_malformed_splits(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Dataset.from_tensors(**(_tensors() | change), num_classes=3)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_from_tensors_refuses_a_bad_class_count(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes="):
        Dataset.from_tensors(**_tensors(), num_classes=num_classes)  # type: ignore[arg-type]
