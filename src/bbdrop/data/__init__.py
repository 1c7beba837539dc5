"""Datasets of the paper (MNIST, Fashion-MNIST, CIFAR-10/100) and scikit-learn's
8x8 digits, read whole into memory, with batched augmentation and batching.

    >>> from bbdrop.data import load_dataset
    >>> ds = load_dataset("digits")
    >>> ds.train_x.shape, ds.test_x.shape, ds.num_classes
    (torch.Size([1437, 1, 8, 8]), torch.Size([360, 1, 8, 8]), 10)
    >>> batches = ds.train_batches(100, torch.Generator().manual_seed(0))  # doctest: +SKIP

Files are looked for in ``<data_dir>/<name>/`` alone when ``data_dir`` is given,
otherwise under ``$BBDROP_DATA``, the user cache and ``/usr/share/datasets``
(``$BBDROP_SYSTEM_DATA`` in its place when set, none when empty; one subfolder per
dataset), and downloaded, verified by size and SHA-256, when
missing; see :func:`load_dataset` and docs/data.md.
"""

from bbdrop.data.augment import (
    RandomCropFlip,
    channel_stats,
    crop_flip,
    normalize_channels,
    random_crop_flip,
)
from bbdrop.data.batches import BatchIterator
from bbdrop.data.cifar import parse_cifar_batch, read_cifar10, read_cifar100
from bbdrop.data.dataset import Dataset
from bbdrop.data.datasets import load_dataset
from bbdrop.data.digits import read_digits
from bbdrop.data.download import (
    ChecksumError,
    DatasetNotFoundError,
    RemoteFile,
    download_file,
    file_sha256,
)
from bbdrop.data.idx import parse_idx, read_idx, read_idx_splits
from bbdrop.data.locations import (
    DATA_ENV_VAR,
    DEFAULT_SYSTEM_DIR,
    SYSTEM_DATA_DIR,
    SYSTEM_ENV_VAR,
    default_cache_dir,
    default_system_dir,
    search_roots,
)
from bbdrop.data.registry import (
    DEFAULT_DATASET,
    DatasetSpec,
    get_dataset_spec,
    list_datasets,
    register_dataset,
)
from bbdrop.data.search import find_dataset_dir
from bbdrop.data.splits import Splits

__all__ = [
    "DATA_ENV_VAR",
    "DEFAULT_DATASET",
    "DEFAULT_SYSTEM_DIR",
    "SYSTEM_DATA_DIR",
    "SYSTEM_ENV_VAR",
    "BatchIterator",
    "ChecksumError",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "RandomCropFlip",
    "RemoteFile",
    "Splits",
    "channel_stats",
    "crop_flip",
    "default_cache_dir",
    "default_system_dir",
    "download_file",
    "file_sha256",
    "find_dataset_dir",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "normalize_channels",
    "parse_cifar_batch",
    "parse_idx",
    "random_crop_flip",
    "read_cifar10",
    "read_cifar100",
    "read_digits",
    "read_idx",
    "read_idx_splits",
    "register_dataset",
    "search_roots",
]
