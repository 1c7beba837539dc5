"""The datasets of the paper and the embedded default, behind one entry point.

``load_dataset(name)`` finds a dataset's files (see :mod:`bbdrop.data.locations`),
downloads them if they are missing, reads the whole set into memory once and
returns float tensors ready to train on:

* ``digits`` (default; ships inside scikit-learn, no files): 1797 8x8 images,
  pixels / 16 in [0, 1], shape (N, 1, 8, 8) (``x.flatten(1)`` for an MLP);
  stratified 80/20 split with ``random_state=0``.
* ``mnist``, ``fashion-mnist``: 60000 + 10000 28x28 images, pixels / 255 in
  [0, 1] (docs/method.md section 4), shape (N, 1, 28, 28).
* ``cifar10``, ``cifar100``: 50000 + 10000 32x32 colour images, pixels / 255
  then normalised per channel with the training set's mean and standard
  deviation, shape (N, 3, 32, 32); training augmentation is random crop (pad 4)
  and horizontal flip, ``Dataset.train_transform``.

A dataset is a :class:`DatasetSpec` in a registry; tests and mirrors pass a
modified spec (``dataclasses.replace``) or ``mirrors=`` instead of patching
module state.

This module is the entry point; the parts live beside it: the container
(:mod:`bbdrop.data.dataset`), the registry (:mod:`bbdrop.data.registry`), the
published files, hashes and registered datasets (:mod:`bbdrop.data.catalogue`),
the search, download and messages (:mod:`bbdrop.data.search`) and the readers
(:mod:`bbdrop.data.idx`, :mod:`bbdrop.data.cifar`, :mod:`bbdrop.data.digits`).
Their names are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from bbdrop.data.augment import RandomCropFlip, normalize_channels
from bbdrop.data.catalogue import CIFAR10_FILES as CIFAR10_FILES
from bbdrop.data.catalogue import CIFAR10_MEAN as CIFAR10_MEAN
from bbdrop.data.catalogue import CIFAR10_STD as CIFAR10_STD
from bbdrop.data.catalogue import CIFAR100_FILES as CIFAR100_FILES
from bbdrop.data.catalogue import CIFAR100_MEAN as CIFAR100_MEAN
from bbdrop.data.catalogue import CIFAR100_STD as CIFAR100_STD
from bbdrop.data.catalogue import CIFAR_MIRRORS as CIFAR_MIRRORS
from bbdrop.data.catalogue import FASHION_MNIST_FILES as FASHION_MNIST_FILES
from bbdrop.data.catalogue import FASHION_MNIST_MIRRORS as FASHION_MNIST_MIRRORS
from bbdrop.data.catalogue import MNIST_FILES as MNIST_FILES
from bbdrop.data.catalogue import MNIST_MIRRORS as MNIST_MIRRORS
from bbdrop.data.dataset import Dataset
from bbdrop.data.digits import DIGITS_SPLIT_SEED as DIGITS_SPLIT_SEED
from bbdrop.data.digits import DIGITS_TEST_FRACTION as DIGITS_TEST_FRACTION
from bbdrop.data.digits import read_digits
from bbdrop.data.idx import read_idx_splits
from bbdrop.data.locations import DEFAULT_SYSTEM_DIR, _Default
from bbdrop.data.registry import (
    DEFAULT_DATASET,
    DatasetSpec,
    get_dataset_spec,
    list_datasets,
    register_dataset,
)
from bbdrop.data.registry import Reader as Reader
from bbdrop.data.search import find_dataset_dir, locate_files
from bbdrop.data.splits import Splits

__all__ = [
    "DEFAULT_DATASET",
    "Dataset",
    "DatasetSpec",
    "find_dataset_dir",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "read_digits",
    "read_idx_splits",
    "register_dataset",
]


# -- loading ----------------------------------------------------------------------------
def load_dataset(
    name: str | DatasetSpec = DEFAULT_DATASET,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = 60.0,
    system_dir: str | os.PathLike[str] | _Default | None = DEFAULT_SYSTEM_DIR,
    verify: bool = True,
) -> Dataset:
    """Find (or download), verify, read and normalise the dataset ``name``.

    Where the files are looked for (see :mod:`bbdrop.data.locations`):

    * ``data_dir`` given: in ``<data_dir>/<name>/`` and nowhere else. That folder
      is used when it holds every file; with ``download`` the missing ones are
      downloaded into it, without, they are refused by name. A ``data_dir`` or
      ``<data_dir>/<name>`` that exists but is not a folder is an error. It is
      never passed over for another folder.
    * ``data_dir`` None: in ``<root>/<name>/`` for each root of
      :func:`~bbdrop.data.locations.search_roots` (``$BBDROP_DATA``, the user
      cache, ``system_dir``); the first folder that holds every file is used, a
      folder that holds only some is passed over, and a root or dataset folder
      that exists but is not a folder is an error. ``system_dir`` defaults to
      ``/usr/share/datasets``, or to ``$BBDROP_SYSTEM_DATA`` when that is set (the
      empty string: no system folder); ``None`` leaves it out. When none is complete, with
      ``download`` the missing files are downloaded into the first root's folder.

    Downloads come from ``mirrors`` (default: the spec's), in order, and are
    verified by size and SHA-256 while they stream; ``progress`` shows a tqdm
    bar; ``timeout`` is per connection, in seconds. With ``verify``, files that
    were already on disk are checked against the published SHA-256 once and the
    result is remembered (:mod:`bbdrop.data.verify`); ``verify=False`` reads
    them unchecked.

    Raises :class:`DatasetNotFoundError` (its subclass :class:`ChecksumError`
    for a corrupt download or a file on disk that is not the published one)
    whose first line names the folder or file and what to do, the next lines the
    folders searched, the file names, sizes, SHA-256s and URLs; ValueError for
    files that are not in the right format or a split with no examples.
    """
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path (str or os.PathLike), got {data_dir!r}")
    spec = _spec_of(name, mirrors)
    location: Path | None = None
    paths: dict[str, Path] = {}
    if spec.files:
        location, paths = locate_files(
            spec,
            data_dir,
            system_dir,
            download=download,
            progress=progress,
            timeout=timeout,
            verify=verify,
        )
    raw = spec.read(paths)
    _check_splits(spec, raw, location)
    return _normalised(spec, raw, location)


def _spec_of(name: str | DatasetSpec, mirrors: Sequence[str] | None) -> DatasetSpec:
    """The spec registered as ``name`` (or ``name`` itself), with ``mirrors`` when given."""
    spec = name if isinstance(name, DatasetSpec) else get_dataset_spec(name)
    if mirrors is not None:
        mirrors = tuple(mirrors)
        if spec.files and not mirrors:
            raise ValueError("mirrors must name at least one base URL")
        spec = replace(spec, mirrors=mirrors)
    return spec


def _normalised(spec: DatasetSpec, raw: Splits, location: Path | None) -> Dataset:
    """The :class:`Dataset` of ``raw`` from ``location``: pixels divided by
    ``spec.pixel_max`` and normalised per channel, with the spec's augmentation."""
    norm = (spec.pixel_max, spec.mean, spec.std)
    return Dataset(
        name=spec.name,
        train_x=normalize_channels(raw.train_x, *norm),
        train_y=raw.train_y,
        test_x=normalize_channels(raw.test_x, *norm),
        test_y=raw.test_y,
        num_classes=spec.num_classes,
        input_shape=spec.input_shape,
        mean=spec.mean,
        std=spec.std,
        train_transform=_augmentation(spec),
        location=location,
    )


def _augmentation(spec: DatasetSpec) -> RandomCropFlip | None:
    """Random crop (pad 4) and flip, padding with black as torchvision's ``RandomCrop``
    does before normalisation: ``-mean / std`` per channel in normalised units."""
    if not spec.augment:
        return None
    fill: float | tuple[float, ...] = 0.0
    if spec.mean is not None and spec.std is not None:
        fill = tuple(-m / s for m, s in zip(spec.mean, spec.std, strict=True))
    return RandomCropFlip(4, flip=True, fill=fill)


def _check_splits(spec: DatasetSpec, raw: Splits, location: Path | None) -> None:
    where = f" in {location}" if location is not None else ""
    if location is not None:
        fix = f"replace the files in {location} with the published ones"
    else:
        fix = f"check the reader of dataset {spec.name!r}"
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != spec.input_shape:
            raise ValueError(
                f"dataset {spec.name!r}{where}: {split} images are {x.dtype} {tuple(x.shape)}, "
                f"expected uint8 (N, {', '.join(map(str, spec.input_shape))}); {fix}"
            )
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise ValueError(
                f"dataset {spec.name!r}{where}: {split} labels are {y.dtype} {tuple(y.shape)}, "
                f"expected int64 ({x.shape[0]},); {fix}"
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"dataset {spec.name!r}{where}: the {split} split has 0 examples; {fix}"
            )
        if int(y.min()) < 0 or int(y.max()) >= spec.num_classes:
            raise ValueError(
                f"dataset {spec.name!r}{where}: {split} labels span [{int(y.min())}, "
                f"{int(y.max())}], expected [0, {spec.num_classes - 1}]; {fix}"
            )
