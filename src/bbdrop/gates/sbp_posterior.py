"""SBP's posterior, ``log theta ~ N(mu, sigma^2)`` truncated to ``[a, b]``, in pure functions.

Structured Bayesian pruning (Neklyudov et al., NIPS 2017; docs/baselines/sbp.md)
multiplies unit k by ``theta_k`` with this posterior against a log-uniform prior on
``[exp(a), exp(b)]``. Here are its KL to the prior, its moments and
signal-to-noise ratio, and reparameterised draws, each reduced to the standard
normal truncated to ``[alpha, beta] = [(a - mu)/sigma, (b - mu)/sigma]`` and
computed by :mod:`bbdrop.gates.truncnorm` (whose docstring gives the numerics);
the gate is :mod:`bbdrop.gates.sbp`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bbdrop.gates.truncnorm import (
    gauss_legendre,
    mass_across_zero,
    tail_quantile,
    truncated_normal_stats,
)

__all__ = [
    "SNR_QUADRATURE_BELOW",
    "sbp_kl",
    "sbp_log_moment",
    "sbp_log_rsample",
    "sbp_mean",
    "sbp_snr",
    "sbp_variance",
]

# SNR: below this sigma the variance comes from quadrature of the tilted variances
# (exact in the limit of small sigma), above it from the moments' closed forms.
SNR_QUADRATURE_BELOW = 1.0
_GL_NODES, _GL_WEIGHTS = gauss_legendre(8)


# -- the SBP posterior: log theta ~ N(mu, sigma^2) truncated to [a, b] ----------------
def _standardise(mu: Tensor, log_sigma: Tensor, a: float, b: float) -> tuple[Tensor, ...]:
    """``(sigma, alpha, beta, L)``: the interval ``[alpha, beta]`` of the standard
    variable and its length ``L = (b - a) / sigma``, computed on its own."""
    sigma = torch.exp(log_sigma)
    return sigma, (a - mu) / sigma, (b - mu) / sigma, (b - a) / sigma


def sbp_kl(mu: Tensor, log_sigma: Tensor, a: float, b: float) -> Tensor:
    """KL(q || p) per unit, q = N(mu, sigma^2) truncated to [a, b] on log theta and
    p uniform on [a, b] (Neklyudov et al. 2017, Sec. 4; SBPcode nets/layers.py:230-238)::

        KL = log(b - a) - H(q) = log(b - a) - log sigma - H(N(0, 1) on [alpha, beta])

    which is the reference's ``log(b-a) - log sqrt(2 pi e) - log sigma - log Z
    - (alpha phi(alpha) - beta phi(beta)) / (2 Z)``, evaluated stably
    (:func:`~bbdrop.gates.truncnorm.truncated_normal_entropy`).
    """
    _, alpha, beta, length = _standardise(mu, log_sigma, a, b)
    return math.log(b - a) - log_sigma - truncated_normal_stats(alpha, beta, length)[1]


def sbp_log_moment(mu: Tensor, log_sigma: Tensor, a: float, b: float, k: int = 1) -> Tensor:
    """``log E[theta^k]``, theta = exp(x), x ~ N(mu, sigma^2) truncated to [a, b].

    The closed form ``E[theta^k] = exp(k mu + k^2 sigma^2/2) (Phi(beta - k sigma) -
    Phi(alpha - k sigma)) / Z`` (SBPcode nets/layers.py:162-167) rearranged so that
    no large terms cancel: with ``xi_j`` the point of ``[alpha, beta]`` nearest
    ``j sigma`` and ``LS`` of :func:`~bbdrop.gates.truncnorm.truncated_normal_log_mass`::

        log E[theta^k] = k clamp(mu + k sigma^2, a, b) + (xi_0^2 - xi_k^2)/2
                         + LS(alpha - k sigma, beta - k sigma) - LS(alpha, beta)
    """
    sigma, alpha, beta, length = _standardise(mu, log_sigma, a, b)
    ks = k * sigma
    xi0 = torch.clamp(torch.zeros_like(alpha), alpha, beta)
    xik = torch.clamp(ks, alpha, beta)
    return (
        k * torch.clamp(mu + ks * sigma, a, b)
        + 0.5 * (xi0 - xik) * (xi0 + xik)
        + truncated_normal_stats(alpha - ks, beta - ks, length)[0]
        - truncated_normal_stats(alpha, beta, length)[0]
    )


def sbp_mean(mu: Tensor, log_sigma: Tensor, a: float, b: float) -> Tensor:
    """E[theta], the SBP gate's test-time value before pruning (SBPcode
    nets/layers.py:170-177)."""
    return torch.exp(sbp_log_moment(mu, log_sigma, a, b, 1))


def _log_relative_variance(mu: Tensor, log_sigma: Tensor, a: float, b: float) -> Tensor:
    """``log(Var[theta] / E[theta]^2) = log(expm1(Delta))``, ``Delta = log E[theta^2] -
    2 log E[theta]``, finite with finite gradients down to ``Delta ~ 1e-37`` (sigma =
    e^-20 with mu beyond b), where ``Delta`` itself and ``1/Delta`` touch float32's range.

    Delta is the second difference ``K(2 sigma) - 2 K(sigma) + K(0)`` of the
    cumulant function ``K(t) = log E[exp(t xi)]`` of the truncated standard normal,
    and ``K''(t)`` is the variance of the standard normal truncated to
    ``[alpha - t, beta - t]``; hence exactly::

        Delta = sigma^2 int_0^1 y (V(sigma y) + V(sigma (2 - y))) dy,
        V(t) = truncated_normal_variance(alpha - t, beta - t)

    For ``sigma < SNR_QUADRATURE_BELOW`` this integral (Gauss-Legendre, 8 nodes per
    half; ``V`` is smooth over a shift of under two units) replaces the difference
    of the closed forms, which cancels to nothing when ``Delta ~ sigma^2 / p^2`` is
    tiny, and gives ``log Delta = 2 log sigma + log(integral)``. Above it the closed
    forms are used: Delta is then no smaller than about ``sigma^2 / (p + 2 sigma)^2``
    (0.02 for the default interval and clamps), far above their rounding error of a
    few ulps of ``log E[theta]``.
    """
    sigma, alpha, beta, length = _standardise(mu, log_sigma, a, b)
    nodes = torch.as_tensor(_GL_NODES, dtype=mu.dtype, device=mu.device)[:, None]
    weights = torch.as_tensor(_GL_WEIGHTS, dtype=mu.dtype, device=mu.device)[:, None]
    n = len(_GL_NODES)
    quadrature = sigma < SNR_QUADRATURE_BELOW
    small = sigma.clamp(max=SNR_QUADRATURE_BELOW)
    steps = torch.cat(
        [nodes, 2.0 - nodes, torch.arange(3.0, dtype=mu.dtype, device=mu.device)[:, None]]
    )
    shifts = torch.cat([small * steps[: 2 * n], sigma * steps[2 * n :]])  # (2n + 3, K)
    ls, _, var = truncated_normal_stats(alpha - shifts, beta - shifts, length.expand_as(shifts))
    tiny = torch.finfo(mu.dtype).tiny
    integral = (weights * nodes * (var[:n] + var[n : 2 * n])).sum(0)
    log_delta_quadrature = 2 * torch.log(small) + torch.log(integral.clamp(min=tiny))
    # closed forms: 2 sigma (xi_2 - xi_1) + (xi_1^2 - xi_0^2)/2 - (xi_2^2 - xi_1^2)/2
    #               + LS(shift 2 sigma) - 2 LS(shift sigma) + LS(shift 0)
    xi0 = torch.clamp(torch.zeros_like(alpha), alpha, beta)
    xi1 = torch.clamp(sigma, alpha, beta)
    xi2 = torch.clamp(2 * sigma, alpha, beta)
    closed = (
        2 * sigma * (xi2 - xi1)
        + 0.5 * (xi1 - xi0) * (xi1 + xi0)
        - 0.5 * (xi2 - xi1) * (xi2 + xi1)
        + ls[2 * n + 2]
        - 2 * ls[2 * n + 1]
        + ls[2 * n]
    )
    log_delta = torch.where(quadrature, log_delta_quadrature, torch.log(closed.clamp(min=tiny)))
    return _log_expm1(log_delta)


def _log_expm1(log_delta: Tensor) -> Tensor:
    """``log(expm1(Delta))`` from ``log Delta``: ``log Delta + log(expm1(Delta)/Delta)``,
    the last term by its series ``Delta/2 + Delta^2/24`` below 1e-3 (error < 1e-15)
    and ``Delta + log(-expm1(-Delta)) - log Delta`` above 1 (no overflow)."""
    delta = torch.exp(log_delta)
    series = delta.clamp(max=1e-3)
    middle = delta.clamp(1e-3, 1.0)
    large = delta.clamp(min=1.0)
    return torch.where(
        delta > 1.0,
        large + torch.log(-torch.expm1(-large)),
        log_delta
        + torch.where(
            delta < 1e-3,
            series * (0.5 + series / 24.0),
            torch.log(torch.expm1(middle) / middle),
        ),
    )


def sbp_variance(mu: Tensor, log_sigma: Tensor, a: float, b: float) -> Tensor:
    """Var[theta] = exp(2 log E[theta] + log(Var/E^2)) (:func:`_log_relative_variance`)."""
    return torch.exp(
        2 * sbp_log_moment(mu, log_sigma, a, b, 1) + _log_relative_variance(mu, log_sigma, a, b)
    )


def sbp_snr(mu: Tensor, log_sigma: Tensor, a: float, b: float) -> Tensor:
    """Signal-to-noise ratio ``E[theta] / std[theta] = exp(-log(Var/E^2) / 2)`` (SBPcode
    nets/layers.py:180-191), finite with finite gradients (about 1e18 at most)."""
    return torch.exp(-0.5 * _log_relative_variance(mu, log_sigma, a, b))


def sbp_log_rsample(
    mu: Tensor, log_sigma: Tensor, a: float, b: float, u: Tensor | None = None
) -> Tensor:
    """One reparameterised draw of ``log theta`` per unit, by inversion of its CDF at
    ``u`` (uniform, drawn when not given, clamped to ``[eps, 1 - eps]``).

    Across 0 as the reference does, ``mu + sigma Phi^-1(Phi(alpha) + u Z)``
    (SBPcode nets/layers.py:204-208), without its clamp of ``Phi(alpha) + u Z`` to
    ``[1e-5, 1 - 1e-5]``, which returns ``log theta = b`` for every draw once ``Z``
    is below 1e-5; on one side of 0 from the near end, ``b - sigma s`` or
    ``a + sigma s`` with ``s`` of :func:`~bbdrop.gates.truncnorm.tail_quantile`.
    """
    sigma, alpha, beta, length = _standardise(mu, log_sigma, a, b)
    if u is None:
        u = torch.rand_like(mu)
    eps = torch.finfo(mu.dtype).eps
    u = u.clamp(eps, 1.0 - eps)
    one_sided = (alpha >= 0) | (beta <= 0)
    ones = torch.ones_like(alpha)
    at_b = beta <= 0  # mass against b: log theta = b - sigma s, else a + sigma s
    p = torch.where(one_sided, torch.where(at_b, -beta, alpha), 0 * ones)
    # s decreases in u against b, so that log theta is increasing in u in every regime
    s = tail_quantile(p, torch.where(one_sided, length, 2 * ones), torch.where(at_b, 1 - u, u))
    tail = torch.where(at_b, b - sigma * s, a + sigma * s)
    lo_x, hi_x = torch.where(one_sided, -2 * ones, alpha), torch.where(one_sided, 2 * ones, beta)
    # below 1 in the dtype: ndtri(1) is inf, and its infinite derivative times the
    # zero gradient of the clamp below would be NaN
    level = torch.special.ndtr(lo_x) + u * mass_across_zero(lo_x, hi_x)
    xi = torch.special.ndtri(level.clamp(max=1.0 - eps / 2))
    across = mu + sigma * torch.clamp(xi, lo_x, hi_x)
    return torch.where(one_sided, tail, across).clamp(a, b)
