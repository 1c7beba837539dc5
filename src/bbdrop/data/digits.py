"""Reader of scikit-learn's 8x8 digits, the default dataset: no files, nothing downloaded.

The UCI optical digits test set (1797 images, values 0..16) ships inside
scikit-learn; :func:`read_digits` splits it 80/20, stratified, with
``random_state=0`` (docs/data.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from bbdrop.data.splits import Splits

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "read_digits"]

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
