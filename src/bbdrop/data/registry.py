"""The registry of datasets :func:`~bbdrop.data.load_dataset` knows, by name.

A dataset is a :class:`DatasetSpec`: its files (or none, for one that ships
inside a package), the mirrors they are published at, the reader that turns them
into raw splits and how to normalise them. The paper's datasets and the embedded
default are registered by :mod:`bbdrop.data.catalogue`; tests and mirrors pass a
modified spec (``dataclasses.replace``) or ``mirrors=`` instead of patching module
state (docs/data.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bbdrop.data.download import RemoteFile
from bbdrop.data.splits import Splits

__all__ = [
    "DEFAULT_DATASET",
    "DatasetSpec",
    "Reader",
    "get_dataset_spec",
    "list_datasets",
    "register_dataset",
]

DEFAULT_DATASET = "digits"

# A reader gets, for each of the spec's files, the local path found for it (the
# file itself or one of its alternatives) and returns the raw splits.
Reader = Callable[[Mapping[str, Path]], Splits]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything :func:`~bbdrop.data.load_dataset` needs to know about one dataset.

    ``files`` are what must be on disk (or downloaded from ``mirrors``, in order);
    ``read`` turns them into uint8 images and int64 labels; pixels are divided by
    ``pixel_max`` and, when ``mean``/``std`` are given, normalised per channel.
    ``augment``: train with random crop (pad 4) and horizontal flip.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    read: Reader
    files: tuple[RemoteFile, ...] = ()
    mirrors: tuple[str, ...] = ()
    pixel_max: float = 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False
    source: str = ""  # where the files come from, for messages and docs

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty folder name, got {self.name!r}")
        if self.files and not self.mirrors:
            raise ValueError(f"dataset {self.name!r} lists files but no mirror")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"dataset {self.name!r}: give both mean and std, or neither")

    @property
    def subdir(self) -> str:
        """The dataset's folder under each search root: its name."""
        return self.name


# -- registry -------------------------------------------------------------------------
_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Make ``spec`` available to :func:`~bbdrop.data.load_dataset` under ``spec.name``."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset expects a DatasetSpec, got {spec!r}")
    if spec.name in _DATASETS:
        raise ValueError(f"dataset name {spec.name!r} is already registered")
    _DATASETS[spec.name] = spec
    return spec


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec registered as ``name``; ValueError listing the names otherwise."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _DATASETS[name]


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return sorted(_DATASETS)
