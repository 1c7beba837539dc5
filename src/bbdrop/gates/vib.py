"""Variational information bottleneck pruning (VIB): Dai, Zhu, Guo, Wipf, "Compressing
Neural Networks using the Variational Information Bottleneck", ICML 2018
(docs/baselines/vib.md).

Unit k is multiplied by ``z_nk = mu_k + sigma_k eps_nk``, ``eps_nk ~ N(0, 1)`` drawn
per example. The penalty is the closed-form bound on the layer's mutual
information, ``0.5 sum_k log(1 + mu_k^2 / sigma_k^2)``: the KL from the Gaussian
posterior of the gated activation to a Gaussian prior whose variance is
optimised. At test time unit k is multiplied by ``mu_k``, or by exactly 0 when
its ``log alpha_k = log sigma_k^2 - log mu_k^2`` reaches the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.distributed import example_noise
from bbdrop.gates.base import Gate, register_gate
from bbdrop.gates.settings import GateSettings

__all__ = [
    "KL_EPS",
    "LOGVAR_MAX",
    "InformationBottleneckGate",
    "vib_kl",
    "vib_log_alpha",
    "vib_rsample",
    "vib_test_values",
]

# The epsilon of the references, under sigma^2 in the penalty and under mu^2 in
# log alpha (VIBcode ib_layers.py:31,60,102; BBcode modules/vib.py:15,30).
KL_EPS = 1e-8
# Ours (the references clamp nothing): log sigma^2 is used clamped from above, so that
# exp(log sigma^2) and the noise stay finite in float32. sigma <= e^10 = 22026 leaves
# every unit with |mu| < 22026 prunable; the penalty keeps no pull below the clamp.
LOGVAR_MAX = 20.0


def vib_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """The VIB penalty per unit, elementwise: ``0.5 log(1 + mu^2 / (sigma^2 + 1e-8))``.

    VIBcode ib_layers.py:95-110, BBcode modules/vib.py:29-32: Dai et al.'s KL to a
    Gaussian prior whose variance is optimised (docs/baselines/vib.md). ``log1p`` of
    the ratio is exact for small ratios (pruned units) and finite in float32 for
    ``|mu| < 1e15``.
    """
    return 0.5 * torch.log1p(mu.square() / (torch.exp(logvar) + KL_EPS))


def vib_log_alpha(mu: Tensor, logvar: Tensor) -> Tensor:
    """``log alpha = log sigma^2 - log(mu^2 + 1e-8)``, the log noise-to-signal ratio
    that decides pruning (VIBcode ib_layers.py:59-60, BBcode modules/vib.py:15)."""
    return logvar - torch.log(mu.square() + KL_EPS)


def vib_test_values(mu: Tensor, logvar: Tensor, threshold: float = 0.0) -> Tensor:
    """Test-time gate ``mu * 1[log alpha < threshold]``: a unit is pruned, to exactly
    zero, iff ``log alpha >= threshold`` (VIBcode ib_layers.py:72-75, ``mask_thresh``
    0; BBcode modules/vib.py:14-16,26, ``thres`` 0)."""
    return mu * (vib_log_alpha(mu, logvar) < threshold).to(mu.dtype)


def vib_rsample(mu: Tensor, logvar: Tensor, num_samples: int, eps: Tensor | None = None) -> Tensor:
    """``z = mu + exp(logvar / 2) eps``, one row per example: shape (num_samples, K).

    ``eps`` is standard normal noise (num_samples, K), drawn when not given
    (VIBcode ib_layers.py:13-19, BBcode modules/vib.py:20-24).
    """
    if eps is None:
        eps = example_noise(lambda s: torch.randn(s, dtype=mu.dtype, device=mu.device),
                            (num_samples, mu.shape[0]))  # fmt: skip
    return mu + torch.exp(0.5 * logvar) * eps


@dataclass(frozen=True, kw_only=True)
class InformationBottleneckSettings(GateSettings):
    """VIB's settings (docs/baselines/vib.md): the pruning ``log_alpha_threshold``, and
    the initial ``init_mu``, ``init_logvar`` and the spread ``init_std`` around them."""

    log_alpha_threshold: float = 0.0
    init_mu: float = 1.0
    init_logvar: float = -9.0
    init_std: float = 0.01

    def check(self) -> None:
        super().check()
        validate.in_range("log_alpha_threshold", self.log_alpha_threshold)
        validate.in_range("init_mu", self.init_mu)
        validate.in_range("init_logvar", self.init_logvar, hi=LOGVAR_MAX)
        validate.non_negative("init_std", self.init_std)


@register_gate("vib")
class InformationBottleneckGate(Gate):
    """VIB pruning over ``num_units`` units (docs/baselines/vib.md).

    Learned per unit: ``mu`` and ``logvar_raw`` (log sigma^2, used clamped to at most
    :data:`LOGVAR_MAX`). Training multiplies unit k of example n by
    ``mu_k + sigma_k eps_nk``; evaluation by :func:`vib_test_values`; with
    ``mc_sampling``, evaluation draws ``z`` as in training and zeroes the pruned
    units (VIBcode's ``sample_in_testing``, ib_layers.py:85-88). The regulariser is
    ``sum_k`` :func:`vib_kl`.

    Args (defaults are the authors', VIBcode ib_layers.py:24,38-42 and BBcode
    modules/vib.py:6-12):
        num_units: K, the features or channels gated.
        kl_scale: weight of the penalty in :func:`bbdrop.total_kl`. The objective adds
            ``kl_scale * penalty / N``, so BBcode's ``gamma * penalty`` is
            ``kl_scale = gamma * N``: 6 for LeNet-500-300 on MNIST (gamma 1e-4,
            scripts/configs/lenet_mlp_mnist_vib.py:11).
        log_alpha_threshold: units with ``log alpha >= log_alpha_threshold`` are pruned
            (0: ``mask_thresh``, ib_layers.py:24; ``thres``, vib.py:7).
        init_mu: initial mu (1: ib_layers.py:40; vib.py:11).
        init_logvar: initial log sigma^2 (-9, ``-init_mag``: ib_layers.py:42; vib.py:12).
        init_std: standard deviation of the Gaussian jitter added to both initial
            values (0.01, ``init_var``: ib_layers.py:40-42; vib.py:11-12).
    """

    Settings = InformationBottleneckSettings

    def __init__(
        self,
        num_units: int,
        kl_scale: float = 1.0,
        log_alpha_threshold: float = 0.0,
        init_mu: float = 1.0,
        init_logvar: float = -9.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__(num_units, kl_scale)
        InformationBottleneckSettings(log_alpha_threshold=log_alpha_threshold, init_mu=init_mu,
                                      init_logvar=init_logvar, init_std=init_std,
                                      kl_scale=kl_scale)  # fmt: skip
        self.log_alpha_threshold = float(log_alpha_threshold)
        self.mu = nn.Parameter(init_mu + init_std * torch.randn(num_units))
        self.logvar_raw = nn.Parameter(init_logvar + init_std * torch.randn(num_units))

    @property
    def logvar(self) -> Tensor:
        """log sigma^2 per unit, clamped to at most :data:`LOGVAR_MAX`."""
        return self.logvar_raw.clamp(max=LOGVAR_MAX)

    def log_alpha(self) -> Tensor:
        """``log sigma^2 - log(mu^2 + 1e-8)`` per unit, shape (K,)."""
        return vib_log_alpha(self.mu, self.logvar)

    def kl(self) -> Tensor:
        """The layer's penalty ``sum_k 0.5 log(1 + mu_k^2 / (sigma_k^2 + 1e-8))``."""
        return vib_kl(self.mu, self.logvar).sum()

    # -- the protocol -------------------------------------------------------------
    def regularizer(self, layer: nn.Module) -> Tensor:
        return self.kl()

    def gate_values(self) -> Tensor:
        return vib_test_values(self.mu, self.logvar, self.log_alpha_threshold) * self.static_keep

    def keep_scores(self) -> Tensor:
        """Minus log alpha: the rule keeps ``log alpha < log_alpha_threshold``."""
        with torch.no_grad():
            return -vib_log_alpha(self.mu, self.logvar)

    def mask(self, x: Tensor) -> Tensor:
        if self.training:  # one Gaussian draw per example and unit: (N, K)
            return vib_rsample(self.mu, self.logvar, x.shape[0])
        if self.mc_sampling:  # units removed by the threshold or prune_ stay removed
            return vib_rsample(self.mu, self.logvar, x.shape[0]) * self.keep_mask()
        return self.gate_values()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, log_alpha_threshold={self.log_alpha_threshold}"
