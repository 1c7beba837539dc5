"""DBB's test-time mask as a plain module (:class:`DependentMask`): what a DBB gate
leaves, on its kept units, in a compacted network (docs/compact.md)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from bbdrop.gates.base import Gate
from bbdrop.gates.masks import Field, TestTimeMask

__all__ = ["DependentMask"]


class DependentMask(TestTimeMask):
    """DBB's test-time mask as a plain module, on the units a compacted network kept:
    ``x * m`` with ``m = z 1[z > t]``, ``z = pi phi(x)``, ``phi = clamp(scale (h - mu) /
    sigma + beta, eps, 1 - eps)``, ``h`` the input (average-pooled over positions for
    a convolution's channels or a dense layer's tokens). Computed as
    :class:`bbdrop.DependentBetaBernoulliGate` computes it in evaluation, operation for
    operation, so the results are the same
    bit for bit; ``pi`` is its E_q[pi] after the BB threshold, ``mul`` its
    ``scale / sigma``."""

    fields: ClassVar[dict[str, Field]] = {
        "units": "width", "eps": ("number", 0, 1, "open"), "threshold": ("number", 0, 1, "closed"),
    }  # fmt: skip

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
        """The mask of a trained DBB ``gate`` (:class:`bbdrop.DependentBetaBernoulliGate`)
        on its units ``units`` (indices)."""
        index = torch.as_tensor(units, dtype=torch.long, device=gate.shift.device)
        mul = torch.rsqrt(gate.running_var + gate.norm_eps) * gate.scale
        mask = cls(gate.gate_values()[index], gate.running_mean[index], mul[index],
                   gate.shift[index], gate.phi_eps, gate.threshold)  # fmt: skip
        mask.layout, mask.unit_size = gate.layout, gate.unit_size
        return mask

    def settings(self) -> dict[str, Any]:
        return {"units": self.pi.numel(), "eps": self.eps, "threshold": self.threshold}

    @classmethod
    def empty(cls, settings: dict[str, Any]) -> DependentMask:
        z = torch.zeros(settings["units"])
        return cls(z, z, z, z, settings["eps"], settings["threshold"])

    def mask(self, x: Tensor) -> Tensor:
        """(N, K): the mask of each example."""
        h = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        phi = torch.addcmul(self.shift, h - self.mean, self.mul).clamp_(self.eps, 1.0 - self.eps)
        # in place, and one threshold in place of a comparison and a product: at batch 256
        # a third less time than out of place (benchmarks/inference.py), the same values
        return F.threshold(phi.mul_(self.pi), self.threshold, 0.0)

    def extra_repr(self) -> str:
        return f"units={self.pi.numel()}, threshold={self.threshold}"
