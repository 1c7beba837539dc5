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
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bbdrop.data.augment import RandomCropFlip, normalize_channels
from bbdrop.data.batches import BatchIterator
from bbdrop.data.cifar import CIFAR10_FOLDER, CIFAR100_FOLDER, read_cifar10, read_cifar100
from bbdrop.data.download import DatasetNotFoundError, RemoteFile, download_file, file_url
from bbdrop.data.idx import read_idx
from bbdrop.data.locations import DATA_ENV_VAR, SYSTEM_DATA_DIR, SearchRoot, search_roots
from bbdrop.data.splits import Splits
from bbdrop.data.verify import default_record_path, verify_files

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

DEFAULT_DATASET = "digits"

# A reader gets, for each of the spec's files, the local path found for it (the
# file itself or one of its alternatives) and returns the raw splits.
Reader = Callable[[Mapping[str, Path]], Splits]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything :func:`load_dataset` needs to know about one dataset.

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


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory: float32 inputs (N, C, H, W), int64 labels (N,).

    ``train_transform`` is the training augmentation, called per batch as
    ``train_transform(x, generator)``, or None when the dataset has none.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    train_transform: RandomCropFlip | None = None
    location: Path | None = None  # the folder the files were read from

    def train_batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        drop_last: bool = False,
        augment: bool = True,
    ) -> BatchIterator:
        """Shuffled training batches, augmented when the dataset calls for it; the
        permutation and the augmentation both draw from ``generator``."""
        transform = None
        if augment and self.train_transform is not None:
            transform = functools.partial(self.train_transform, generator=generator)
        return BatchIterator(
            self.train_x,
            self.train_y,
            batch_size,
            shuffle=True,
            drop_last=drop_last,
            generator=generator,
            transform=transform,
        )

    def test_batches(self, batch_size: int) -> BatchIterator:
        """Test batches in order, no augmentation."""
        return BatchIterator(self.test_x, self.test_y, batch_size)

    def hold_out(self, n: int) -> Dataset:
        """This dataset with its last ``n`` training examples as the evaluation set.

        The test set is left out entirely, so settings chosen on the result have
        not seen it. Fashion-MNIST's and MNIST's training files are not ordered
        by class, so the last examples are a fair sample.
        """
        total = self.train_x.shape[0]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < total:
            raise ValueError(
                f"data.validation={n!r}: must be an int that leaves training examples; "
                f"the training set of {self.name!r} has {total}"
            )
        return replace(
            self,
            train_x=self.train_x[:-n],
            train_y=self.train_y[:-n],
            test_x=self.train_x[-n:],
            test_y=self.train_y[-n:],
        )

    @classmethod
    def from_tensors(
        cls,
        train_x: Tensor,
        train_y: Tensor,
        test_x: Tensor,
        test_y: Tensor,
        num_classes: int,
        name: str = "tensors",
    ) -> Dataset:
        """A dataset from tensors already in memory: floating-point inputs (N, ...) and
        int64 labels (N,) in ``[0, num_classes)``, at least one example per split.
        Anything else raises a one-line ValueError naming the tensor."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"dataset {name!r}: num_classes={num_classes!r}; give a positive int")
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            _check_tensors(name, split, x, y, num_classes)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise ValueError(
                f"dataset {name!r}: test_x examples are {tuple(test_x.shape[1:])} but train_x "
                f"examples are {tuple(train_x.shape[1:])}; give both splits the same shape"
            )
        return cls(name, train_x, train_y, test_x, test_y, num_classes, tuple(train_x.shape[1:]))

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with its tensors on ``device``."""
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )


def _check_tensors(name: str, split: str, x: Tensor, y: Tensor, num_classes: int) -> None:
    """One split of :meth:`Dataset.from_tensors`: the first problem as a ValueError."""
    where = f"dataset {name!r}: {split}"
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(
            f"{where}_x and {split}_y must be tensors, got {type(x).__name__} and "
            f"{type(y).__name__}; convert them with torch.as_tensor"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{where}_x is {x.dtype}; inputs must be floating point, e.g. x.float() / 255"
        )
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{where} split has 0 examples; give at least one")
    if y.dtype != torch.int64:
        raise ValueError(
            f"{where}_y is {y.dtype}; labels must be int64 class indices, e.g. y.long()"
        )
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{where}_x has {x.shape[0]} examples but {split}_y has shape {tuple(y.shape)}; "
            f"give one label per example, shape ({x.shape[0]},)"
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{where}_y spans [{low}, {high}], outside [0, {num_classes}) for "
            f"num_classes={num_classes}; relabel to 0..{num_classes - 1} or raise num_classes"
        )


# -- registry -------------------------------------------------------------------------
_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Make ``spec`` available to :func:`load_dataset` under ``spec.name``."""
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


# -- loading ----------------------------------------------------------------------------
def load_dataset(
    name: str | DatasetSpec = DEFAULT_DATASET,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = 60.0,
    system_dir: str | os.PathLike[str] | None = SYSTEM_DATA_DIR,
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
      that exists but is not a folder is an error. When none is complete, with
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
    spec = name if isinstance(name, DatasetSpec) else get_dataset_spec(name)
    if mirrors is not None:
        mirrors = tuple(mirrors)
        if spec.files and not mirrors:
            raise ValueError("mirrors must name at least one base URL")
        spec = replace(spec, mirrors=mirrors)
    location: Path | None = None
    paths: dict[str, Path] = {}
    if spec.files:
        fetch = functools.partial(
            _fetch, spec, download=download, progress=progress, timeout=timeout
        )
        downloaded: list[Path] = []
        if data_dir is not None:
            roots = search_roots(data_dir)  # the named folder, alone
        else:
            roots = search_roots(None, system_dir)
        location = find_dataset_dir(spec, roots)
        if location is None:
            location = roots[0].path / spec.subdir
            downloaded = fetch(roots, location, explicit=data_dir is not None)
        paths = _resolve(spec, location)
        if verify:
            verify_files(spec.files, paths, trusted=downloaded, record=default_record_path())
    raw = spec.read(paths)
    _check_splits(spec, raw, location)
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


def find_dataset_dir(spec: DatasetSpec, roots: Sequence[SearchRoot]) -> Path | None:
    """The first ``<root>/<subdir>`` that holds every file of ``spec``, or None.

    A folder that holds only some of them is passed over. A root, or a root's
    ``<subdir>``, that exists but is not a folder raises
    :class:`DatasetNotFoundError` when the search reaches it.
    """
    for root in roots:
        if root.path.exists() and not root.path.is_dir():
            raise DatasetNotFoundError(
                f"{_describe_root(root)} {root.path} is not a folder; {_root_fix(root, spec)}"
            )
        folder = root.path / spec.subdir
        if folder.exists() and not folder.is_dir():
            raise DatasetNotFoundError(
                f"dataset {spec.name!r}: {folder} ({root.origin}) is not a folder; remove or "
                f"rename it, the dataset's files go in a folder of that name"
            )
        if folder.is_dir() and all(_local_path(folder, f) is not None for f in spec.files):
            return folder
    return None


def _describe_root(root: SearchRoot) -> str:
    return {
        "data_dir argument": "data_dir",
        f"${DATA_ENV_VAR}": f"${DATA_ENV_VAR}",
        "user cache": "the user cache",
        "system datasets": "system_dir",
    }.get(root.origin, root.origin)


def _root_fix(root: SearchRoot, spec: DatasetSpec) -> str:
    return {
        "data_dir argument": (
            f"give the folder that holds (or will hold) {spec.subdir}/, not a file"
        ),
        f"${DATA_ENV_VAR}": f"point ${DATA_ENV_VAR} at a folder, or unset it",
        "user cache": "remove or rename that file, or set $XDG_CACHE_HOME to another folder",
        "system datasets": "remove or rename that file, or pass system_dir=None",
    }.get(root.origin, "remove or rename that file")


def _resolve(spec: DatasetSpec, folder: Path) -> dict[str, Path]:
    paths = {}
    for f in spec.files:
        path = _local_path(folder, f)
        if path is None:  # only if the folder changed under our feet
            raise DatasetNotFoundError(
                f"dataset {spec.name!r}: {folder / f.name} disappeared while loading; "
                f"run again once nothing else is changing {folder}"
            )
        paths[f.name] = path
    return paths


def _local_path(folder: Path, remote: RemoteFile) -> Path | None:
    # Alternatives (uncompressed, extracted) first: they are faster to read.
    for name in (*remote.alternatives, remote.name):
        if (folder / name).exists():
            return folder / name
    return None


def _fetch(
    spec: DatasetSpec,
    roots: Sequence[SearchRoot],
    target: Path,
    *,
    explicit: bool,
    download: bool,
    progress: bool,
    timeout: float,
) -> list[Path]:
    """Download the files missing from ``target`` into it (creating it); the paths
    downloaded. ``explicit``: ``target`` is the folder the caller named."""
    missing = [f for f in spec.files if _local_path(target, f) is None]
    allow = "or allow downloads (download=True; data.download=true in a run's settings)"
    if not download:
        if explicit and not target.exists():
            headline = (
                f"no folder {target}, and download=False; create it with the files below, {allow}"
            )
        elif explicit:
            names = ", ".join(f.name for f in missing)
            headline = (
                f"{target} lacks {names}, and download=False; place them there (see below), {allow}"
            )
        else:
            headline = (
                f"no complete copy in the {len(roots)} folder{'s' * (len(roots) != 1)} searched, "
                "and download=False; "
                f"place the files below in {target}, {allow}"
            )
        raise DatasetNotFoundError(_not_found_message(spec, roots, target, headline))
    try:
        created = _make_dirs(target)
    except OSError as err:
        headline = (
            f"could not create {target} ({err.strerror or err}); place the files below there "
            f"yourself, or choose a folder that can be written (data_dir, ${DATA_ENV_VAR})"
        )
        raise DatasetNotFoundError(_not_found_message(spec, roots, target, headline)) from err
    downloaded = []
    try:
        for remote in missing:
            downloaded.append(
                download_file(remote, spec.mirrors, target, progress=progress, timeout=timeout)
            )
    except BaseException as err:
        for folder in reversed(created):  # leave no empty folder of ours behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, DatasetNotFoundError):
            headline, *details = str(err).splitlines()
            message = _not_found_message(spec, roots, target, headline, details)
            raise type(err)(message) from err
        raise
    return downloaded


def _make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p folder``; the folders it created, outermost first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _not_found_message(
    spec: DatasetSpec,
    roots: Sequence[SearchRoot],
    target: Path,
    headline: str,
    details: Sequence[str] = (),
) -> str:
    """``dataset '<name>': <headline>`` on the first line; then ``details`` (one
    line per URL tried), the folders searched and what each held, the files to
    place in ``target`` with their sizes and SHA-256s, and their URLs."""
    width = max(len(f.name) for f in spec.files)
    lines = [f"dataset {spec.name!r}: {headline.strip()}"]
    lines += [f"  {line.strip()}" for line in details]
    lines.append("Searched, in order:" if len(roots) > 1 else "Searched:")
    for root in roots:
        folder = root.path / spec.subdir
        lines.append(f"  {folder}  ({root.origin}: {_folder_status(spec, folder)})")
    lines.append(f"To use it offline, place these files in {target}:")
    for f in spec.files:
        size = f"{f.size} bytes, " if f.size is not None else ""
        also = f"; or its unpacked form {', '.join(f.alternatives)}" if f.alternatives else ""
        lines.append(f"  {f.name:<{width}}  ({size}sha256 {f.sha256}{also})")
    lines.append("They are published at:")
    lines += [f"  {file_url(m, f.name)}" for f in spec.files for m in spec.mirrors]
    if spec.source:
        lines.append(f"Source: {spec.source}")
    return "\n".join(lines)


def _folder_status(spec: DatasetSpec, folder: Path) -> str:
    if not folder.is_dir():
        return "no folder"
    have = sum(_local_path(folder, f) is not None for f in spec.files)
    return f"{have} of {len(spec.files)} files"


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


# -- readers ----------------------------------------------------------------------------
_IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def read_idx_splits(paths: Mapping[str, Path], num_classes: int = 10) -> Splits:
    """MNIST-style splits from the four IDX files (gzip or raw), keyed by their
    published ``.gz`` names; images become (N, 1, H, W)."""
    tr_x, tr_y, te_x, te_y = (paths[f"{name}.gz"] for name in _IDX_NAMES)
    out = []
    for images_path, labels_path in ((tr_x, tr_y), (te_x, te_y)):
        images = read_idx(images_path, dtype=np.uint8, shape=(None, None, None))
        labels = read_idx(labels_path, dtype=np.uint8, shape=(None,))
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{labels_path}: {labels.shape[0]} labels for the {images.shape[0]} images "
                f"of {images_path}"
            )
        if labels.numel() and int(labels.max()) >= num_classes:
            raise ValueError(
                f"{labels_path}: label {int(labels.max())} outside [0, {num_classes - 1}]"
            )
        out += [images.unsqueeze(1), labels.to(torch.int64)]
    return Splits(*out)


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def read_digits(paths: Mapping[str, Path] | None = None) -> Splits:
    """scikit-learn's 8x8 digits (UCI optical digits test set, 1797 images, values
    0..16) as uint8 (N, 1, 8, 8), split 80/20, stratified, ``random_state=0``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    images = lambda a: torch.from_numpy(a.astype(np.uint8).reshape(-1, 1, 8, 8))  # noqa: E731
    labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return Splits(images(x_tr), labels(y_tr), images(x_te), labels(y_te))


def _idx_files(
    checksums: Sequence[tuple[str, int, str]], content: Mapping[str, str] | None = None
) -> tuple[RemoteFile, ...]:
    content = content or {}
    return tuple(
        RemoteFile(
            name,
            sha256,
            size,
            alternatives=(name.removesuffix(".gz"),),
            content_sha256=content.get(name),
        )
        for name, size, sha256 in checksums
    )


# -- the registered datasets ------------------------------------------------------------
# Checksums: size in bytes and SHA-256 of each published file.
# MNIST: tensorflow/datasets, tensorflow_datasets/url_checksums/mnist.txt, for the
#   same four files on Google's cvdf mirror. The two mirrors below serve the same
#   bytes (torchvision gives one MD5 per file for both), and public download
#   scripts pinning the ossci-datasets and yann.lecun.com URLs list these same
#   SHA-256s and sizes.
# Fashion-MNIST: tensorflow/datasets, url_checksums/fashion_mnist.txt, for these
#   exact URLs. Cross-checked against Debian's dataset-fashion-mnist, which ships
#   the same deflate streams with the gzip header's file name dropped and its
#   mtime reset: restoring them (mtime 2017-08-31 10:50 UTC) reproduces all four
#   sizes and SHA-256s exactly (tests/data/test_real_files.py, when installed).
#   The content SHA-256s (of the decompressed IDX bytes) were computed from those
#   Debian files (package dataset-fashion-mnist 0.0~git20200523.55506a9-1) with
#   ``gunzip -c /usr/share/datasets/fashion-mnist/<name> | sha256sum``; since
#   their deflate streams are the published ones, so are the contents. They let a
#   recompressed copy (Debian's) or an uncompressed one be verified.
#   MNIST and CIFAR have no such offline source: their uncompressed or extracted
#   forms are checked only by the readers (docs/data.md).
# CIFAR: Keras (keras/datasets/cifar10.py and cifar100.py, ``file_hash``) and
#   torchvision's prototype datasets (``_SHA256``) for these URLs; the sizes as
#   pinned by independent projects that verify these archives.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_FILES = _idx_files(
    (
        (
            "train-images-idx3-ubyte.gz",
            9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        (
            "t10k-images-idx3-ubyte.gz",
            1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        (
            "t10k-labels-idx1-ubyte.gz",
            4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    )
)
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
FASHION_MNIST_FILES = _idx_files(
    (
        (
            "train-images-idx3-ubyte.gz",
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        (
            "t10k-images-idx3-ubyte.gz",
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        (
            "t10k-labels-idx1-ubyte.gz",
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    ),
    content={
        "train-images-idx3-ubyte.gz": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),  # 47040016 bytes
        "train-labels-idx1-ubyte.gz": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),  # 60008 bytes
        "t10k-images-idx3-ubyte.gz": (
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        ),  # 7840016 bytes
        "t10k-labels-idx1-ubyte.gz": (
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
        ),  # 10008 bytes
    },
)
CIFAR_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
CIFAR10_FILES = (
    RemoteFile(
        "cifar-10-python.tar.gz",
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        170498071,
        alternatives=(CIFAR10_FOLDER,),
    ),
)
CIFAR100_FILES = (
    RemoteFile(
        "cifar-100-python.tar.gz",
        "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        169001437,
        alternatives=(CIFAR100_FOLDER,),
    ),
)

# Per-channel mean and population standard deviation of pixels / 255 over all
# pixels of the 50000 training images, i.e. ``(data / 255).mean(axis=(0, 1, 2))``
# and ``.std(axis=(0, 1, 2))`` of the (N, 32, 32, 3) training array, as public
# training scripts compute and quote them; :func:`bbdrop.data.augment.channel_stats`
# recomputes them from ``read_cifar10(path).train_x``. (The also common CIFAR-10
# std 0.2023, 0.1994, 0.2010 is not the channel's standard deviation.)
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)

register_dataset(
    DatasetSpec(
        "digits", 10, (1, 8, 8), read_digits, pixel_max=16.0, source="scikit-learn (embedded)"
    )
)
register_dataset(
    DatasetSpec(
        "mnist",
        10,
        (1, 28, 28),
        read_idx_splits,
        files=MNIST_FILES,
        mirrors=MNIST_MIRRORS,
        source="http://yann.lecun.com/exdb/mnist/",
    )
)
register_dataset(
    DatasetSpec(
        "fashion-mnist",
        10,
        (1, 28, 28),
        read_idx_splits,
        files=FASHION_MNIST_FILES,
        mirrors=FASHION_MNIST_MIRRORS,
        source="https://github.com/zalandoresearch/fashion-mnist",
    )
)
register_dataset(
    DatasetSpec(
        "cifar10",
        10,
        (3, 32, 32),
        lambda paths: read_cifar10(paths[CIFAR10_FILES[0].name]),
        files=CIFAR10_FILES,
        mirrors=CIFAR_MIRRORS,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        augment=True,
        source="https://www.cs.toronto.edu/~kriz/cifar.html",
    )
)
register_dataset(
    DatasetSpec(
        "cifar100",
        100,
        (3, 32, 32),
        lambda paths: read_cifar100(paths[CIFAR100_FILES[0].name]),
        files=CIFAR100_FILES,
        mirrors=CIFAR_MIRRORS,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        augment=True,
        source="https://www.cs.toronto.edu/~kriz/cifar.html",
    )
)
