"""Structured Bayesian pruning (SBP): Neklyudov et al., NIPS 2017 (docs/baselines/sbp.md).

Unit k is multiplied by ``theta_k``, whose logarithm has the posterior
``N(mu_k, sigma_k^2)`` truncated to ``[a, b]``; the prior is log-uniform on
``[exp(a), exp(b)]``, i.e. uniform on ``log theta in [a, b]``. Training draws one
``theta`` per unit and minibatch, shared by all its examples; evaluation multiplies
unit k by ``E[theta_k]`` if its signal-to-noise ratio ``E[theta]/std[theta]`` exceeds
a threshold and by 0 otherwise.

This module is the gate. The posterior's KL, moments, SNR and sampler are pure
functions of tensors in :mod:`bbdrop.gates.sbp_posterior`, resting on the truncated
normal of :mod:`bbdrop.gates.truncnorm` (stable however far ``[alpha, beta]`` lies in
a tail); both are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.gates.base import Gate, register_gate
from bbdrop.gates.sbp_posterior import sbp_kl, sbp_log_rsample, sbp_mean, sbp_snr
from bbdrop.gates.settings import GateSettings

__all__ = ["StructuredBayesianPruningGate"]

# Clamps of mu and log sigma wherever they are used (SBPcode nets/layers.py:225-226;
# BBcode modules/sbp.py:80-81).
MU_MIN, MU_MAX = -20.0, 5.0
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -20.0, 5.0

# Ends of the interval of log theta: exp(+-80) is a normal float32, so that a kept unit's
# E[theta] >= exp(a) is never 0 (a unit is counted as kept by its non-zero value).
LOG_THETA_BOUND = 80.0


# -- the gate ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StructuredBayesianPruningSettings(GateSettings):
    """SBP's settings (docs/baselines/sbp.md): the log-uniform prior's interval ``a``,
    ``b`` of log theta, the pruning ``threshold`` on the signal-to-noise ratio, and
    the posterior's initial ``init_mu``, ``init_log_sigma``."""

    a: float = -20.0
    b: float = 0.0
    threshold: float = 1.0
    init_mu: float = 0.0
    init_log_sigma: float = -5.0

    def check(self) -> None:
        super().check()
        validate.in_range("a", self.a, -LOG_THETA_BOUND, LOG_THETA_BOUND)
        validate.in_range("b", self.b, -LOG_THETA_BOUND, LOG_THETA_BOUND)
        if not self.a < self.b:
            raise ValueError(
                f"a must be < b (the interval of log theta), got a={self.a!r}, b={self.b!r}"
            )
        validate.non_negative("threshold (an SNR)", self.threshold)
        validate.in_range("init_mu", self.init_mu, MU_MIN, MU_MAX)
        validate.in_range("init_log_sigma", self.init_log_sigma, LOG_SIGMA_MIN, LOG_SIGMA_MAX)


@register_gate("sbp")
class StructuredBayesianPruningGate(Gate):
    """Structured Bayesian pruning over ``num_units`` units (Neklyudov et al. 2017).

    Multiplies unit k by ``theta_k``, ``log theta_k ~ N(mu_k, sigma_k^2)`` truncated
    to ``[a, b]``, with a log-uniform prior on ``[exp(a), exp(b)]``. Training draws
    one ``theta`` per unit and step, shared by the minibatch's examples (SBPcode
    nets/layers.py:207; BBcode modules/sbp.py:119); evaluation multiplies unit k by
    ``E[theta_k] * 1[SNR_k > threshold]`` (SBPcode nets/layers.py:244-255).
    ``mu`` and ``log sigma`` are clamped to [-20, 5] wherever used (SBPcode
    nets/layers.py:225-226; BBcode modules/sbp.py:80-81).

    Args:
        num_units: K, the features or channels gated.
        a, b: the truncation interval of ``log theta``, within [-80, 80] (-20 and 0:
            SBPcode nets/layers.py:212-213; BBcode modules/sbp.py:69).
        threshold: units whose SNR is at most this are pruned (1: SBPcode
            nets/layers.py:211, ``threshold=1.0``; BBcode modules/sbp.py:69).
        kl_scale: weight of this gate's KL in :func:`bbdrop.total_kl` (1; BBcode's
            LeNet5-Caffe "scale" config uses 40 and 16 for the two convolutions,
            scripts/configs/lenet_caffe_mnist_sbp_scale.py:8).
        init_mu, init_log_sigma: initial ``mu`` and ``log sigma`` (0 and -5: SBPcode
            nets/layers.py:217-224; BBcode modules/sbp.py:75-76).
    """

    Settings = StructuredBayesianPruningSettings

    def __init__(
        self,
        num_units: int,
        a: float = -20.0,
        b: float = 0.0,
        threshold: float = 1.0,
        kl_scale: float = 1.0,
        init_mu: float = 0.0,
        init_log_sigma: float = -5.0,
    ) -> None:
        super().__init__(num_units, kl_scale)
        StructuredBayesianPruningSettings(
            a=a, b=b, threshold=threshold, kl_scale=kl_scale, init_mu=init_mu,
            init_log_sigma=init_log_sigma,
        )  # fmt: skip
        self.a = float(a)
        self.b = float(b)
        self.threshold = float(threshold)
        self.mu = nn.Parameter(torch.full((num_units,), float(init_mu)))
        self.log_sigma = nn.Parameter(torch.full((num_units,), float(init_log_sigma)))

    # -- posterior ----------------------------------------------------------------
    def clamped(self) -> tuple[Tensor, Tensor]:
        """``(mu, log sigma)`` as used: clamped to [-20, 5] like the reference's."""
        return (
            self.mu.clamp(MU_MIN, MU_MAX),
            self.log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX),
        )

    def expected_theta(self) -> Tensor:
        """E[theta], shape (K,)."""
        return sbp_mean(*self.clamped(), self.a, self.b)

    def snr(self) -> Tensor:
        """E[theta] / std[theta], shape (K,)."""
        return sbp_snr(*self.clamped(), self.a, self.b)

    def sample_theta(self) -> Tensor:
        """One reparameterised draw of theta per unit, shape (K,)."""
        return torch.exp(sbp_log_rsample(*self.clamped(), self.a, self.b))

    # -- the protocol -------------------------------------------------------------
    def kl(self) -> Tensor:
        """Sum over units of KL(q(theta_k) || p(theta_k)) (:func:`sbp_kl`)."""
        return sbp_kl(*self.clamped(), self.a, self.b).sum()

    def regularizer(self, layer: nn.Module) -> Tensor:
        return self.kl()

    def gate_values(self) -> Tensor:
        with torch.no_grad():
            keep = (self.snr() > self.threshold) & self.static_keep
        return self.expected_theta() * keep

    def keep_scores(self) -> Tensor:
        """The signal-to-noise ratio: the rule keeps ``snr > threshold``."""
        with torch.no_grad():
            return self.snr()

    def mask(self, x: Tensor) -> Tensor:
        if self.training:  # one theta per unit, shared by the minibatch: (K,)
            return self.sample_theta()
        if self.mc_sampling:  # a posterior draw; pruned units stay pruned
            return self.sample_theta() * self.keep_mask()
        return self.gate_values()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, a={self.a}, b={self.b}, threshold={self.threshold}"
