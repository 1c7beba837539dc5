"""The datasets bbdrop knows: their published files, sizes and SHA-256s, mirrors,
normalisation statistics, and their registration.

``digits`` (embedded in scikit-learn), ``mnist``, ``fashion-mnist``, ``cifar10``
and ``cifar100`` are registered here (:func:`~bbdrop.data.registry.register_dataset`)
when :mod:`bbdrop.data` is imported; where each checksum comes from is noted
beside it (docs/data.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bbdrop.data.cifar import CIFAR10_FOLDER, CIFAR100_FOLDER, read_cifar10, read_cifar100
from bbdrop.data.digits import read_digits
from bbdrop.data.download import RemoteFile
from bbdrop.data.idx import read_idx_splits
from bbdrop.data.registry import DatasetSpec, register_dataset
from bbdrop.data.splits import Splits

__all__ = [
    "CIFAR10_FILES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_FILES",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_MIRRORS",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MIRRORS",
    "MNIST_FILES",
    "MNIST_MIRRORS",
]


def _idx_files(
    checksums: Sequence[tuple[str, int, str]], content: Mapping[str, str] | None = None
) -> tuple[RemoteFile, ...]:
    """The IDX files of ``checksums`` (published name, size, SHA-256), each also
    accepted uncompressed; ``content``: SHA-256s of the uncompressed bytes, by name."""
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


def _idx(
    name: str, files: tuple[RemoteFile, ...], mirrors: tuple[str, ...], source: str
) -> DatasetSpec:
    """An MNIST-like data set: 28x28 grey images in the four gzipped IDX files."""
    return DatasetSpec(name, 10, (1, 28, 28), read_idx_splits, files=files, mirrors=mirrors,
                       source=source)  # fmt: skip


def _cifar(
    name: str,
    classes: int,
    read: Callable[[Path], Splits],
    files: tuple[RemoteFile, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> DatasetSpec:
    """A CIFAR data set: 32x32 colour images in one archive, normalised by its training
    set's channel statistics and augmented in training."""
    return DatasetSpec(name, classes, (3, 32, 32), lambda paths: read(paths[files[0].name]),
                       files=files, mirrors=CIFAR_MIRRORS, mean=mean, std=std, augment=True,
                       source="https://www.cs.toronto.edu/~kriz/cifar.html")  # fmt: skip


register_dataset(_idx("mnist", MNIST_FILES, MNIST_MIRRORS, "http://yann.lecun.com/exdb/mnist/"))
register_dataset(_idx("fashion-mnist", FASHION_MNIST_FILES, FASHION_MNIST_MIRRORS,
                      "https://github.com/zalandoresearch/fashion-mnist"))  # fmt: skip
register_dataset(_cifar("cifar10", 10, read_cifar10, CIFAR10_FILES, CIFAR10_MEAN, CIFAR10_STD))
register_dataset(
    _cifar("cifar100", 100, read_cifar100, CIFAR100_FILES, CIFAR100_MEAN, CIFAR100_STD)
)
