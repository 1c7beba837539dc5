"""The in-memory form of a dataset as read from disk, before normalisation."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["Splits"]


class Splits(NamedTuple):
    """Raw pixels and labels: uint8 images (N, C, H, W) and int64 labels (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
