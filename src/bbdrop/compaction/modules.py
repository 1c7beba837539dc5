"""The modules a compacted network is built of: :class:`SelectFeatures` (a gather of
the features a layer reads), :class:`DependentMask` (DBB's test-time mask),
:class:`PrunedLayer` (a layer with them), and the :class:`CompactWarning`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbdrop.gates.base import Gate


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
    of a layer that reads some of its input, a :class:`DependentMask` before or after
    it. A Sequential, told apart so that a saved network can be rebuilt."""


class DependentMask(nn.Module):
    """DBB's test-time mask as a plain module, on the units a compacted network kept:
    ``x * m`` with ``m = z 1[z > t]``, ``z = pi phi(x)``, ``phi = clamp(scale (h - mu) /
    sigma + beta, eps, 1 - eps)``, ``h`` the input (average-pooled over positions for
    a convolution's channels). Computed as :class:`bbdrop.DependentBetaBernoulliGate`
    computes it in evaluation, operation for operation, so the results are the same
    bit for bit; ``pi`` is its E_q[pi] after the BB threshold, ``mul`` its
    ``scale / sigma``."""

    def __init__(
        self, pi: Tensor, mean: Tensor, mul: Tensor, shift: Tensor, eps: float, threshold: float
    ) -> None:
        super().__init__()
        for name, value in (("pi", pi), ("mean", mean), ("mul", mul), ("shift", shift)):
            self.register_buffer(name, value.detach().clone())
        self.eps = float(eps)
        self.threshold = float(threshold)

    @classmethod
    @torch.no_grad()
    def from_gate(cls, gate: Gate, units: list[int]) -> DependentMask:
        """The mask of a trained DBB ``gate`` on its units ``units`` (indices)."""
        index = torch.as_tensor(units, dtype=torch.long, device=gate.shift.device)
        mul = torch.rsqrt(gate.running_var + gate.norm_eps) * gate.scale
        return cls(gate.gate_values()[index], gate.running_mean[index], mul[index],
                   gate.shift[index], gate.phi_eps, gate.threshold)  # fmt: skip

    def mask(self, x: Tensor) -> Tensor:
        """(N, K): the mask of each example."""
        h = x.mean(dim=(2, 3)) if x.dim() == 4 else x
        phi = torch.addcmul(self.shift, h - self.mean, self.mul).clamp_(self.eps, 1.0 - self.eps)
        # in place, and one threshold in place of a comparison and a product: at batch 256
        # a third less time than out of place (benchmarks/inference.py), the same values
        return F.threshold(phi.mul_(self.pi), self.threshold, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        m = self.mask(x)
        return x * (m[..., None, None] if x.dim() == 4 else m)

    def extra_repr(self) -> str:
        return f"units={self.pi.numel()}, threshold={self.threshold}"
