"""The modules a compacted network is built of: :class:`SelectFeatures` (a gather of
the features a layer reads), :class:`PrunedLayer` (a layer with it and with an
input-dependent gate's test-time mask, a :class:`bbdrop.gates.TestTimeMask` such as
DBB's :class:`bbdrop.gates.dbb_mask.DependentMask`), and the :class:`CompactWarning`."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CompactWarning(UserWarning):
    """The compacted network differs from the gated one by more than rounding, at a
    place where removal is inexact by nature (a constant channel into a padded
    convolution); the message gives the measured difference."""


class SelectFeatures(nn.Module):
    """``x[:, index]``: the features (dimension 1) a pruned layer still reads.

    Args:
        index: the kept features, int64, increasing.
        num_features: the width of the input it selects from (for checks and export).
    """

    def __init__(self, index: Tensor, num_features: int) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.int64))
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.num_features}"


class PrunedLayer(nn.Sequential):
    """A compacted layer with what runs beside it: the :class:`SelectFeatures` in front
    of a layer that reads some of its input, a test-time mask (:meth:`bbdrop.Gate.to_module`)
    before or after it. A Sequential, told apart so that a saved network can be rebuilt."""
