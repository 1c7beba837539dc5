"""Minibatches of tensors that are already in memory, without torch's DataLoader.

For a dataset held as two tensors, a DataLoader calls ``__getitem__`` once per
example and collates the results in Python; indexing the tensors once per batch
with a permutation does the same work in a few vectorised calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from bbdrop import validate

__all__ = ["BatchIterator"]


class BatchIterator:
    """Iterate over ``(x[idx], y[idx])`` batches of ``batch_size`` examples.

    Each pass (epoch) visits every example once; with ``shuffle`` the order is a
    fresh permutation drawn from ``generator`` (torch's global generator when
    None), so two iterators built with equally seeded generators yield the same
    batches. ``drop_last`` leaves out a final incomplete batch. ``transform``, if
    given, maps each batch of inputs (e.g. :class:`RandomCropFlip`); it must not
    modify its argument in place, since unshuffled batches are views of ``x``.
    ``len()`` is the number of batches per epoch. Batches live on ``x``'s device.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() == 0 or y.dim() == 0:
            raise TypeError("x and y must be tensors with a leading example dimension")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}")
        validate.whole("batch_size", batch_size, lo=1)
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator
        self.transform = transform

    @property
    def num_examples(self) -> int:
        """Examples per epoch, after ``drop_last``."""
        n = self.x.shape[0]
        return n - n % self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, bs = self.x.shape[0], self.batch_size
        order = None
        if self.shuffle:
            device = self.generator.device if self.generator is not None else "cpu"
            order = torch.randperm(n, generator=self.generator, device=device).to(self.x.device)
        for start in range(0, len(self) * bs, bs):
            if order is None:
                xb, yb = self.x[start : start + bs], self.y[start : start + bs]
            else:
                idx = order[start : start + bs]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if self.transform is not None:
                xb = self.transform(xb)
            yield xb, yb

    def __repr__(self) -> str:
        return (
            f"BatchIterator(examples={self.x.shape[0]}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, batches={len(self)})"
        )
