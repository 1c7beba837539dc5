"""The modules a compacted network adds to the user's: :class:`SelectFeatures` (a gather
of the features a layer reads, beside it as an input-dependent gate's test-time mask is:
:mod:`bbdrop.compaction.attached`), and the :class:`CompactWarning`."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CompactWarning(UserWarning):
    """The compacted network differs from the gated one by more than rounding, at a
    place where removal is inexact by nature (a constant channel into a padded
    convolution); the message gives the measured difference."""


class SelectFeatures(nn.Module):
    """``x.index_select(dim, index)``: the features a pruned layer still reads (on
    dimension 1, the channels of a convolution; -1 for a ``Linear``, which reads the
    last dimension of (N, ..., K)).

    Args:
        index: the kept features, int64, increasing.
        num_features: the width of the input it selects from (for checks and export).
        dim: where the features are.
    """

    def __init__(self, index: Tensor, num_features: int, dim: int = 1) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.int64))
        self.num_features = int(num_features)
        self.dim = int(dim)

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(self.dim, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.num_features}"

