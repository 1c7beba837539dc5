"""BB and DBB gates computed the way the authors' public code computes them, as a timing reference.

The authors' code (PyTorch 0.4) draws pi from the Kumaraswamy posterior with the
inverse-CDF formula, builds ``torch.distributions.RelaxedBernoulli(tau, probs=pi)``
and calls ``rsample`` for the batch, then multiplies; DBB adds a batch-normalised
phi and a second relaxed Bernoulli mask. Nothing here is fused or written out
by hand: every step is a plain torch call that autograd records. The gates are
registered as ``ref-bb`` and ``ref-dbb`` so that the benchmark trains them with
bbdrop's own loop (:func:`bbdrop.train.loop.train_stage`): the only difference
timed is how the gates compute.

Only for benchmarks/: the library's gates are bbdrop.gates.bb and bbdrop.gates.dbb.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import RelaxedBernoulli

from bbdrop.gates.base import Gate, create_gate, list_gates, register_gate

EULER_GAMMA = 0.5772156649015329


class ReferenceBB(Gate):
    """BB as the authors write it: Kumaraswamy draw, RelaxedBernoulli.rsample, multiply."""

    def __init__(self, num_units: int, kl_scale: float = 1.0) -> None:
        super().__init__(num_units, kl_scale)
        self.alpha, self.temperature, self.threshold = 1e-4, 0.1, 1e-3
        self.a_uc = nn.Parameter(torch.full((num_units,), -1.0))
        self.b_uc = nn.Parameter(torch.full((num_units,), 0.5413))

    def params(self) -> tuple[Tensor, Tensor]:
        return F.softplus(self.a_uc.clamp(min=-10.0)), F.softplus(self.b_uc.clamp(-10.0, 50.0))

    def sample_pi(self) -> Tensor:
        a, b = self.params()
        u = torch.rand(self.num_units, device=a.device).clamp(1e-6, 1.0 - 1e-6)
        return (1.0 - u.pow(1.0 / b)).pow(1.0 / a)

    def mask(self, x: Tensor) -> Tensor:
        if self.training:
            pi = self.sample_pi().clamp(1e-10, 1.0 - 1e-10)
            return RelaxedBernoulli(torch.tensor(self.temperature), probs=pi).rsample(
                torch.Size([x.shape[0]])
            )
        return self.gate_values()

    def regularizer(self, layer: nn.Module) -> Tensor:
        a, b = self.params()
        kl = (1.0 - self.alpha / a) * (-EULER_GAMMA - torch.digamma(b) - 1.0 / b)
        kl = kl + torch.log(a * b) - math.log(self.alpha) - (b - 1.0) / b
        return kl.sum()

    def gate_values(self) -> Tensor:
        a, b = self.params()
        m = torch.exp(torch.log(b) + torch.lgamma(1 + 1 / a) + torch.lgamma(b)
                      - torch.lgamma(1 + 1 / a + b))  # fmt: skip
        return m * (m >= self.threshold) * self.static_keep


class ReferenceDBB(ReferenceBB):
    """DBB as the authors write it: BB's mask times a RelaxedBernoulli(phi) mask."""

    def __init__(self, num_units: int, kl_scale: float = 1.0) -> None:
        super().__init__(num_units, kl_scale)
        self.a_uc.requires_grad_(False)  # the two-stage scheme: BB frozen
        self.b_uc.requires_grad_(False)
        self.gamma = nn.Parameter(torch.ones(num_units))
        self.beta = nn.Parameter(torch.ones(num_units))
        self.beta_std_uc = nn.Parameter(torch.full((num_units,), 0.5413))
        self.bn = nn.BatchNorm1d(num_units, affine=False)

    def phi(self, x: Tensor) -> Tensor:
        h = x.detach()
        if h.dim() == 4:
            h = h.mean(dim=(2, 3))
        beta = self.beta + F.softplus(self.beta_std_uc) * torch.randn_like(self.beta)
        return (self.gamma * self.bn(h) + beta).clamp(1e-10, 1.0 - 1e-10)

    def mask(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.gate_values() * self.phi(x)
        temperature = torch.tensor(self.temperature)
        pi = self.sample_pi().clamp(1e-10, 1.0 - 1e-10)
        z_pi = RelaxedBernoulli(temperature, probs=pi).rsample(torch.Size([x.shape[0]]))
        z_phi = RelaxedBernoulli(temperature, probs=self.phi(x)).rsample()
        return z_pi * z_phi

    def regularizer(self, layer: nn.Module) -> Tensor:
        s = F.softplus(self.beta_std_uc)
        rho = math.sqrt(5.0)
        gauss = torch.log(rho / s) + (s.square() + self.beta.square()) / (2 * rho**2) - 0.5
        return super().regularizer(layer) + gauss.sum()


def register() -> None:
    """Register ``ref-bb`` and ``ref-dbb`` (once)."""
    if "ref-bb" not in list_gates():
        register_gate("ref-bb")(ReferenceBB)
        register_gate("ref-dbb")(ReferenceDBB)


__all__ = ["ReferenceBB", "ReferenceDBB", "create_gate", "register"]
