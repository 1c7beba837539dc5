"""Readers of CIFAR-10 and CIFAR-100 in their "python version" pickle batches.

Krizhevsky's archives (https://www.cs.toronto.edu/~kriz/cifar.html) hold Python 2
pickles of dicts: ``b"data"`` is an (N, 3072) uint8 array, each row the 1024 red,
then green, then blue values of a 32x32 image in row-major order; the labels are
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100), lists of N ints.
CIFAR-10 has ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` under
``cifar-10-batches-py/``; CIFAR-100 has ``train`` and ``test`` under
``cifar-100-python/``.

Both readers take the extracted folder or the ``.tar.gz`` itself (read in one
pass, nothing extracted). The pickles are read with ``encoding="bytes"`` by an
unpickler that resolves only the three numpy names an array needs, so a batch
cannot run code when loaded. The archive is checked against its published SHA-256
when it is downloaded and, unless ``verify=False``, once when it is found on disk;
an extracted folder has no published checksum and gets only these readers' checks.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bbdrop.data.splits import Splits

__all__ = [
    "CIFAR10_FOLDER",
    "CIFAR100_FOLDER",
    "parse_cifar_batch",
    "read_cifar10",
    "read_cifar100",
]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_IMAGE_BYTES = 3 * 32 * 32


def read_cifar10(path: str | os.PathLike[str]) -> Splits:
    """CIFAR-10 from ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``: 50000 + 10000."""
    blobs = _read_members(Path(path), CIFAR10_FOLDER, (*_CIFAR10_TRAIN, "test_batch"))
    train = [parse_cifar_batch(*blobs[name], b"labels", 10) for name in _CIFAR10_TRAIN]
    test_x, test_y = parse_cifar_batch(*blobs["test_batch"], b"labels", 10)
    return Splits(
        torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y
    )


def read_cifar100(path: str | os.PathLike[str]) -> Splits:
    """CIFAR-100 (fine labels) from ``cifar-100-python/`` or ``cifar-100-python.tar.gz``."""
    blobs = _read_members(Path(path), CIFAR100_FOLDER, ("train", "test"))
    train_x, train_y = parse_cifar_batch(*blobs["train"], b"fine_labels", 100)
    test_x, test_y = parse_cifar_batch(*blobs["test"], b"fine_labels", 100)
    return Splits(train_x, train_y, test_x, test_y)


def parse_cifar_batch(
    blob: bytes,
    source: str = "<bytes>",
    label_key: bytes = b"labels",
    num_classes: int = 10,
) -> tuple[Tensor, Tensor]:
    """Decode one pickled batch into uint8 images (N, 3, 32, 32) and int64 labels (N,).

    Anything but a dict with an (N, 3072) uint8 ``b"data"`` and N labels in
    ``[0, num_classes)`` under ``label_key`` raises ValueError naming ``source``.
    """
    try:
        batch = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{source}: not a readable CIFAR pickle ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(batch, dict):
        raise ValueError(f"{source}: a CIFAR batch must be a dict, got {type(batch).__name__}")
    for key in (b"data", label_key):
        if key not in batch:
            raise ValueError(
                f"{source}: missing key {key!r}; keys present: {sorted(map(repr, batch))}"
            )
    data = batch[b"data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _IMAGE_BYTES
    ):
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise ValueError(
            f"{source}: b'data' must be a uint8 array of shape (N, {_IMAGE_BYTES}), got {desc}"
        )
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{source}: {label_key!r} is not a list of integers ({err})") from err
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{source}: {label_key!r} has shape {labels.shape}, expected ({data.shape[0]},) "
            "to match b'data'"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{source}: {label_key!r} holds values in [{labels.min()}, {labels.max()}], "
            f"expected [0, {num_classes - 1}]"
        )
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _read_members(path: Path, folder: str, names: Sequence[str]) -> Mapping[str, tuple[bytes, str]]:
    """``name -> (bytes, where they came from)`` for ``folder/<name>``, read from the
    folder (``path`` itself or ``path/folder``) or from a .tar.gz archive."""
    if path.is_dir():
        root = path / folder if (path / folder).is_dir() else path
        out = {}
        for name in names:
            file = root / name
            if not file.is_file():
                raise ValueError(f"{root}: missing batch file {name!r} (expected {list(names)})")
            out[name] = (file.read_bytes(), str(file))
        return out
    wanted = {f"{folder}/{name}": name for name in names}
    out = {}
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:  # one sequential pass over the compressed stream
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or not member.isfile():
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                out[name] = (handle.read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(
            f"{path}: corrupt or truncated archive ({type(err).__name__}: {err})"
        ) from err
    missing = [member for member, name in wanted.items() if name not in out]
    if missing:
        raise ValueError(f"{path}: archive lacks {missing}")
    return out


# The only globals an ndarray's pickle needs; numpy 1.x wrote ``numpy.core``,
# numpy 2 writes ``numpy._core``. Taken from ndarray.__reduce__ so that no
# deprecated module is imported.
_RECONSTRUCT = np.empty(0, dtype=np.uint8).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR batch "
                "(only numpy arrays, lists, ints and bytes are)"
            ) from None
