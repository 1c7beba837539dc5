"""The in-memory dataset every loader returns: :class:`Dataset`.

Float inputs (N, C, H, W) and int64 labels (N,) for a training and a test split,
with the training augmentation and batching that go with them. :func:`load_dataset
<bbdrop.data.load_dataset>` builds one from files (docs/data.md),
:meth:`Dataset.from_tensors` from tensors already in memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from bbdrop import validate
from bbdrop.data.augment import RandomCropFlip
from bbdrop.data.batches import BatchIterator

__all__ = ["Dataset"]


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
        if not validate.is_whole(n) or not 0 < n < total:
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
        if not validate.is_whole(num_classes) or num_classes < 1:
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
