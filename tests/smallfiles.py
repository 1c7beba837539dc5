"""Tiny datasets in the real on-disk formats, laid out as ``<root>/<name>/`` the way
:func:`bbdrop.data.load_dataset` looks for them, for the end-to-end tests.

The writers themselves are those of the data tests (``tests/data/datafiles.py``),
imported under the same module name the data tests use so that there is one copy.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np

_DATA_TESTS = str(Path(__file__).resolve().parent / "data")
if _DATA_TESTS not in sys.path:
    sys.path.insert(0, _DATA_TESTS)
datafiles = importlib.import_module("datafiles")

# The published file names a dataset folder must hold (MNIST and Fashion-MNIST alike).
IDX_FILES = tuple(f"{name}.gz" for name in datafiles.MNIST_NAMES)


def write_idx_dataset(
    root: Path, name: str, n_train: int, n_test: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """The four gzipped IDX files of MNIST or Fashion-MNIST (28x28 images, labels 0..9)
    in ``root/<name>/``; returns the arrays written, keyed by the unpacked file names."""
    arrays = datafiles.mnist_arrays(n_train, n_test, seed)
    datafiles.write_mnist(root / name, arrays, gz=True)
    return arrays


def write_cifar_dataset(
    root: Path, name: str, n_train: int, archive: bool = False
) -> dict[str, np.ndarray]:
    """A miniature CIFAR-10 or CIFAR-100 (python pickle batches) in ``root/<name>/``,
    as the extracted folder or as the published ``.tar.gz``, with ``n_train``
    training images (CIFAR-10: five batches of ``n_train / 5`` and a test batch of
    as many; CIFAR-100: ``train`` and a ``test`` of half as many); returns the arrays."""
    cifar100 = name == "cifar100"
    per_file = n_train // 2 if cifar100 else n_train // 5
    if per_file * (2 if cifar100 else 5) != n_train:
        raise ValueError(f"{name}: {n_train} training images do not split into its batches")
    _, expected = datafiles.write_cifar(root / name, cifar100, n=per_file, archive=archive)
    return expected


def write_dataset(root: Path, name: str, n_train: int, n_test: int = 10) -> None:
    """Small files of data set ``name`` (mnist, fashion-mnist, cifar10, cifar100)."""
    if name in ("mnist", "fashion-mnist"):
        write_idx_dataset(root, name, n_train, n_test)
    elif name == "cifar10":
        write_cifar_dataset(root, name, n_train, archive=False)
    elif name == "cifar100":
        write_cifar_dataset(root, name, n_train, archive=True)
    else:
        raise ValueError(f"no small-file writer for data set {name!r}")
