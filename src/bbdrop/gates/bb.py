"""Beta-Bernoulli dropout (BB): Lee et al., Sec. 4.1 (docs/method.md section 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.gates import functional as BF
from bbdrop.gates.base import Gate, register_gate
from bbdrop.gates.settings import GateSettings

__all__ = ["BetaBernoulliGate"]

# Raw-parameter clamps and initial values of the authors' public code.
A_RAW_MIN = -10.0
B_RAW_MIN, B_RAW_MAX = -10.0, 50.0
UNIFORM_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class BetaBernoulliSettings(GateSettings):
    """BB's settings (docs/method.md section 1): the prior's ``alpha``, the relaxed
    Bernoulli's ``temperature``, the pruning ``threshold`` on ``E_q[pi]``, and the
    Kumaraswamy posterior's initial ``init_a``, ``init_b`` (the authors' values)."""

    alpha: float = 1e-4
    temperature: float = 0.1
    threshold: float = 1e-3
    init_a: float = math.log1p(math.exp(-1.0))
    init_b: float = 1.0

    def check(self) -> None:
        super().check()
        validate.positive("alpha", self.alpha)
        validate.positive("temperature", self.temperature)
        validate.probability("threshold", self.threshold)
        validate.positive("init_a", self.init_a)
        validate.positive("init_b", self.init_b)


@register_gate("bb")
class BetaBernoulliGate(Gate):
    """Beta-Bernoulli dropout over ``num_units`` units.

    Model: ``pi_k ~ Beta(alpha, 1)``, ``z_nk ~ Bernoulli(pi_k)``; posterior
    ``q(pi_k) = Kumaraswamy(a_k, b_k)`` with ``a = softplus(a_raw)``,
    ``b = softplus(b_raw)``. Training draws one ``pi`` per step and a relaxed
    Bernoulli mask per example; evaluation multiplies unit k by
    ``E_q[pi_k] * 1[E_q[pi_k] >= threshold]``.

    Args:
        num_units: K, the features or channels gated.
        alpha: the prior's first parameter, ``alpha / K`` in the paper's
            notation (the authors use 1e-4 for every layer).
        temperature: concrete relaxation temperature tau.
        threshold: units whose ``E_q[pi]`` falls below it are pruned.
        kl_scale: weight of this gate's KL in :func:`bbdrop.total_kl` (the paper
            suggests a constant above 1 for convolutional layers, whose few
            masks the dense layers' KL otherwise out-weighs).
        init_a, init_b: initial Kumaraswamy parameters (softplus(-1) and 1 in
            the authors' code: ``E_q[pi]`` starts at 0.24).
    """

    Settings = BetaBernoulliSettings

    def __init__(
        self,
        num_units: int,
        alpha: float = 1e-4,
        temperature: float = 0.1,
        threshold: float = 1e-3,
        kl_scale: float = 1.0,
        init_a: float = math.log1p(math.exp(-1.0)),
        init_b: float = 1.0,
    ) -> None:
        super().__init__(num_units, kl_scale)
        BetaBernoulliSettings(alpha=alpha, temperature=temperature, threshold=threshold,
                              kl_scale=kl_scale, init_a=init_a, init_b=init_b)  # fmt: skip
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.a_raw = nn.Parameter(torch.full((num_units,), BF.softplus_inverse(init_a)))
        self.b_raw = nn.Parameter(torch.full((num_units,), BF.softplus_inverse(init_b)))

    # -- posterior ----------------------------------------------------------------
    @property
    def a(self) -> Tensor:
        return F.softplus(self.a_raw.clamp(min=A_RAW_MIN))

    @property
    def b(self) -> Tensor:
        return F.softplus(self.b_raw.clamp(B_RAW_MIN, B_RAW_MAX))

    def posterior(self) -> torch.distributions.Kumaraswamy:
        """q(pi) as a torch distribution (for inspection; the gate samples on its own)."""
        return torch.distributions.Kumaraswamy(self.a, self.b)

    def prior(self) -> torch.distributions.Beta:
        """p(pi) = Beta(alpha, 1)."""
        return torch.distributions.Beta(
            torch.full_like(self.a_raw, self.alpha), torch.ones_like(self.a_raw)
        )

    def expected_pi(self) -> Tensor:
        """E_q[pi], shape (K,)."""
        return BF.kumaraswamy_mean(self.a, self.b)

    def sample_pi(self) -> Tensor:
        """One reparameterised draw of pi from q, shape (K,)."""
        return BF.kumaraswamy_rsample(self.a, self.b, eps=UNIFORM_EPS)

    def sample_logit_pi(self) -> Tensor:
        """``logit(pi)`` for one reparameterised draw of pi, shape (K,)."""
        return BF.kumaraswamy_logit_rsample(self.a, self.b, eps=UNIFORM_EPS)

    # -- the protocol -------------------------------------------------------------
    def kl(self) -> Tensor:
        """Sum over units of KL(q(pi_k) || p(pi_k)) (docs/method.md section 1)."""
        return BF.kumaraswamy_beta_kl(self.a, self.b, self.alpha).sum()

    def regularizer(self, layer: nn.Module) -> Tensor:
        return self.kl()

    def gate_values(self) -> Tensor:
        m = self.expected_pi()
        return m * ((m >= self.threshold) & self.static_keep)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self.check_input(x)
        return BF.relaxed_bernoulli_mul(x, self.sample_logit_pi(), self.temperature)

    def mask(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if self.training:  # one pi per step, a relaxed Bernoulli(pi) per example: (N, K)
            return BF.relaxed_bernoulli_rsample(self.sample_logit_pi(), self.temperature, (n,))
        if self.mc_sampling:  # units removed by the threshold or prune_ stay removed
            return torch.bernoulli(self.sample_pi().expand(n, -1)) * self.keep_mask()
        return self.gate_values()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, temperature={self.temperature}, "
            f"threshold={self.threshold}"
        )
