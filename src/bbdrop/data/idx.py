"""Reader of the IDX format of MNIST and Fashion-MNIST, gzip-compressed or raw.

An IDX file (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a 4-byte magic
number, ``0x00 0x00 <dtype code> <rank>``, then ``rank`` sizes as big-endian
uint32, then the values in C order, big-endian. Whether a file is gzip-compressed
is decided by its first two bytes, not by its name. :func:`read_idx_splits` reads
the four files of MNIST or Fashion-MNIST as training and test splits.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bbdrop.data.splits import Splits

__all__ = ["IDX_DTYPES", "parse_idx", "read_idx", "read_idx_splits"]

# dtype code of the magic number -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(
    path: str | os.PathLike[str],
    *,
    dtype: np.dtype | type | None = None,
    shape: Sequence[int | None] | None = None,
) -> Tensor:
    """Read the IDX file at ``path`` (gzip or raw) into a tensor in native byte order.

    ``dtype`` and ``shape`` state what the caller expects (``None`` in ``shape``
    accepts any size along that axis); a file that does not match, is truncated,
    has trailing bytes or a bad header raises ValueError naming the file.
    """
    path = Path(path)
    blob = path.read_bytes()
    if blob[:2] == _GZIP_MAGIC:
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip stream ({err})") from err
    return parse_idx(blob, str(path), dtype=dtype, shape=shape)


def parse_idx(
    blob: bytes,
    source: str = "<bytes>",
    *,
    dtype: np.dtype | type | None = None,
    shape: Sequence[int | None] | None = None,
) -> Tensor:
    """Decode uncompressed IDX bytes; ``source`` names them in error messages."""
    if len(blob) < 4:
        raise ValueError(f"{source}: {len(blob)} bytes is too short for an IDX header (4 bytes)")
    if blob[0] != 0 or blob[1] != 0:
        raise ValueError(
            f"{source}: bad IDX magic number {blob[:4].hex()!r}: the first two bytes must be "
            "zero (is this an IDX file?)"
        )
    code, rank = blob[2], blob[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{source}: unknown IDX dtype code 0x{code:02X}; known: {known}")
    if rank == 0:
        raise ValueError(f"{source}: IDX rank is 0; expected at least one dimension")
    header = 4 + 4 * rank
    if len(blob) < header:
        raise ValueError(
            f"{source}: truncated header: rank {rank} needs {header} bytes, file has {len(blob)}"
        )
    sizes = tuple(int(s) for s in np.frombuffer(blob, dtype=">u4", count=rank, offset=4))
    file_dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(sizes, dtype=np.int64)) * file_dtype.itemsize
    if len(blob) != expected:
        kind = "truncated" if len(blob) < expected else "trailing bytes"
        raise ValueError(
            f"{source}: {kind}: header says sizes {sizes} of {file_dtype.name} "
            f"({expected} bytes with the header), file has {len(blob)} bytes"
        )
    if dtype is not None and np.dtype(dtype) != file_dtype.newbyteorder("="):
        raise ValueError(
            f"{source}: IDX dtype code 0x{code:02X} ({file_dtype.name}), expected "
            f"{np.dtype(dtype).name}"
        )
    if shape is not None and (
        len(shape) != rank
        or any(w is not None and w != s for w, s in zip(shape, sizes, strict=True))
    ):
        want = ", ".join("*" if w is None else str(w) for w in shape)
        raise ValueError(f"{source}: IDX sizes {sizes} (rank {rank}), expected ({want})")
    values = np.frombuffer(blob, dtype=file_dtype, offset=header).reshape(sizes)
    return torch.from_numpy(values.astype(file_dtype.newbyteorder("="), copy=True))


# -- MNIST-style splits ------------------------------------------------------------------
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
