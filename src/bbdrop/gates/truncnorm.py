"""The standard normal truncated to an interval, as pure functions of tensors.

Its log mass, entropy and variance (:func:`truncated_normal_stats`), the Mills
ratio they rest on and the quantiles of a tail (:func:`tail_quantile`), stable
however far the interval lies in a tail, in float32 as in float64. They serve
structured Bayesian pruning (Neklyudov et al., NIPS 2017; docs/baselines/sbp.md),
whose posterior is a truncated log-normal: :mod:`bbdrop.gates.sbp_posterior`.

Numerics. In the standard variable ``xi = (log theta - mu)/sigma`` SBP's posterior is
a standard normal truncated to ``[alpha, beta] = [(a - mu)/sigma, (b - mu)/sigma]``.
The closed forms of the reference code (``Z = Phi(beta) - Phi(alpha)``, moments
through ``erfcx``) lose everything once ``[alpha, beta]`` lies in a tail: ``Z``
underflows (the authors saw 1e-37 on LeNet5-Caffe and an infinite KL gradient),
and ``log Z`` cancels against terms of size ``beta^2`` in the entropy. Here an
interval on one side of 0 is written from its end nearest 0, ``p = min(|alpha|,
|beta|)``: with ``s = |xi| - p`` the truncated density is ``exp(-p s - s^2/2) / I0``
on ``[0, q - p]``, and ``I0``, ``E[s]``, ``E[s^2]`` follow from the Mills ratio
``m(x) = (1 - Phi(x)) / phi(x)`` at ``p`` and ``q`` (continued fraction for large
``x``, whose gradient stays exact where ``erfcx``'s backward cancels). Every
quantity is then a sum of terms of moderate size, in float32 as in float64, for
every ``mu, log sigma`` inside the SBP gate's clamps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CF_FROM",
    "CF_TERMS",
    "CF_TERMS_DEFAULT",
    "NEWTON_STEPS",
    "gauss_legendre",
    "mass_across_zero",
    "mills_ratio",
    "tail_quantile",
    "truncated_normal_entropy",
    "truncated_normal_log_mass",
    "truncated_normal_stats",
    "truncated_normal_variance",
]


def gauss_legendre(n: int) -> tuple[list[float], list[float]]:
    """Gauss-Legendre nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (0.5 * (x + 1.0)).tolist(), (0.5 * w).tolist()


# Mills ratio: erfcx below CF_FROM, Laplace's continued fraction from there on, with
# enough terms for the dtype at CF_FROM (relative error of w = 1 - x t1 below 3e-8 with
# 14 terms, 1e-14 with 32; the error falls quickly as x grows).
CF_FROM = 4.0
CF_TERMS = {torch.float64: 32}
CF_TERMS_DEFAULT = 14
# Quadrature of the truncated density over intervals where it is nearly flat.
_FLAT_NODES, _FLAT_WEIGHTS = gauss_legendre(12)
# Newton steps of the sampler (it converges from one side; 8 reach float64's resolution).
NEWTON_STEPS = 8

_SQRT_HALF = math.sqrt(0.5)
_SQRT_HALF_PI = math.sqrt(0.5 * math.pi)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)


# -- the standard normal -----------------------------------------------------------
def _pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x - _LOG_SQRT_2PI)


def mills_ratio(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(m, t1, w)`` at ``x >= 0``: the Mills ratio ``m = (1 - Phi(x)) / phi(x)``,
    ``t1 = 1/m - x`` and ``w = 1 - x t1``, each with relative accuracy near the
    dtype's resolution, and with gradients as accurate.

    Below :data:`CF_FROM` through ``erfcx``; from there on through Laplace's
    continued fraction ``m = 1/(x + 1/(x + 2/(x + 3/(x + ...))))``, whose tails
    ``t_k = k/(x + t_{k+1})`` give ``t1`` and ``w = t1 t2`` without cancellation
    (``1/m - x`` and ``erfcx``'s own backward, ``2 y erfcx(y) - 2/sqrt(pi)``,
    cancel there: the true values are about ``1/x`` and ``1/x^2``).
    """
    small = x.clamp(max=CF_FROM)
    m_small = _SQRT_HALF_PI * torch.special.erfcx(small * _SQRT_HALF)
    t1_small = 1.0 / m_small - small
    w_small = 1.0 - small * t1_small
    big = x.clamp(min=CF_FROM)
    t = torch.zeros_like(big)
    for k in range(CF_TERMS.get(x.dtype, CF_TERMS_DEFAULT), 1, -1):
        t = k / (big + t)
    t1_big = 1.0 / (big + t)  # t is t2 here
    w_big = t1_big * t
    m_big = 1.0 / (big + t1_big)
    use_cf = x >= CF_FROM
    return (
        torch.where(use_cf, m_big, m_small),
        torch.where(use_cf, t1_big, t1_small),
        torch.where(use_cf, w_big, w_small),
    )


def _tail_moments(p: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(I0, E[s], E[s^2])`` for the density ``exp(-p s - s^2/2) / I0`` on
    ``[0, L]``, ``L = length`` (the standard normal truncated to ``[p, q]``,
    ``0 <= p < q = p + L``, seen from ``p``: ``s = xi - p``, and ``Phi(q) - Phi(p) =
    phi(p) I0``).

    With ``L = q - p`` and ``g = phi(q)/phi(p) = exp(-L (p + q)/2)``, integration by
    parts of ``(d/ds) exp(-p s - s^2/2) = -(p + s) exp(...)`` gives::

        I0 = m(p) - g m(q)
        I1 = m(p) t1(p) - g (u(q) + L m(q)),               u = m t1 = 1 - x m
        I2 = m(p) w(p)  + g (p (u(q) + L m(q)) - m(q) - L)

    with ``I1 = I0 E[s]`` and ``I2 = I0 E[s^2]``: no term is much larger than the
    result when ``g <= 1/e`` (for large ``p``, ``E[s] ~ 1/p`` comes out of
    ``t1 ~ 1/p`` directly).
    """
    q = p + length
    g = torch.exp(-0.5 * length * (p + q))
    (m_p, m_q), (t1_p, t1_q), (w_p, _) = mills_ratio(torch.stack([p, q]))  # one pass
    far = m_q * t1_q + length * m_q
    i0 = m_p - g * m_q
    i1 = m_p * t1_p - g * far
    i2 = m_p * w_p + g * (p * far - m_q - length)
    return i0, i1 / i0, i2 / i0


def _flat_moments(lo: Tensor, length: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log I0, E[(xi^2 - c^2)/2], Var[xi])`` by Gauss-Legendre quadrature (12
    nodes) where ``exp(-(xi^2 - c^2)/2)`` varies by a factor of at most ``e`` over
    ``[lo, lo + length]`` (an entire function, integrated to the dtype's resolution),
    where the closed forms would cancel (short intervals: the variance is
    ``~ L^2/12``)."""
    shape = (-1,) + (1,) * lo.dim()
    nodes = torch.as_tensor(_FLAT_NODES, dtype=lo.dtype, device=lo.device).view(shape)
    weights = torch.as_tensor(_FLAT_WEIGHTS, dtype=lo.dtype, device=lo.device).view(shape)
    d = length * nodes  # xi - lo: (nodes, ...)
    half_excess = 0.5 * (lo - c + d) * (lo + c + d)  # (xi^2 - c^2)/2; lo - c is 0 or lo
    f = weights * torch.exp(-half_excess)
    total = f.sum(0)
    mean_y = (f * nodes).sum(0) / total
    var = length.square() * (f * (nodes - mean_y).square()).sum(0) / total
    return torch.log(length * total), (f * half_excess).sum(0) / total, var


def mass_across_zero(lo: Tensor, hi: Tensor) -> Tensor:
    """``Phi(hi) - Phi(lo)`` for ``lo < 0 < hi``, as a sum (no cancellation)."""
    return 0.5 * (torch.erf(hi * _SQRT_HALF) - torch.erf(lo * _SQRT_HALF))


def truncated_normal_stats(lo: Tensor, hi: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(LS, H, V)`` of the standard normal truncated to ``[lo, hi]``, of length
    ``length`` (passed on its own: for the shifted ``[alpha - k sigma, beta - k
    sigma]`` neither ``hi - lo`` nor ``lo + length`` keeps the digits that matter):

    * ``LS = log((Phi(hi) - Phi(lo)) / phi(c))``, ``c`` the point of ``[lo, hi]``
      nearest 0: the log mass less its Gaussian factor ``-c^2/2 - log sqrt(2 pi)``;
    * ``H``, the differential entropy;
    * ``V``, the variance.

    Three regimes, each free of cancellation where it is used, and each computed
    from the end nearest 0 and the length (an interval on one side of 0 is
    mirrored onto ``[p, p + L]``, ``p = |c|``; nothing here changes under the
    mirror): intervals over which the density varies by at most a factor ``e`` by
    quadrature (:func:`_flat_moments`); other intervals on one side of 0 from
    their near end (:func:`_tail_moments`: ``H = log I0 + p E[s] + E[s^2]/2``,
    ``V = E[s^2] - E[s]^2``); the rest, across 0 with an end beyond ``sqrt(2)``, by
    the textbook ``log(sqrt(2 pi e) Z) + (lo phi(lo) - hi phi(hi)) / (2 Z)`` and
    ``1 + (lo phi(lo) - hi phi(hi))/Z - ((phi(lo) - phi(hi))/Z)^2``. Each regime
    gets harmless stand-in intervals where another applies, so that none produces
    inf or NaN (whose zero gradient would still poison the result through ``where``).
    """
    one_sided = (lo >= 0) | (hi <= 0)
    p = torch.where(one_sided, torch.where(lo >= 0, lo, -hi), torch.zeros_like(lo))
    spread = torch.where(
        one_sided, length * (p + 0.5 * length), 0.5 * torch.maximum(-lo, hi).square()
    )
    flat = spread <= 1.0  # exp(-xi^2/2) varies by a factor of at most e over the interval
    tail = one_sided & ~flat
    across = ~one_sided & ~flat
    ones = torch.ones_like(lo)

    p_t = torch.where(tail, p, 0 * ones)
    i0, s1, s2 = _tail_moments(p_t, torch.where(tail, length, 2 * ones))
    tail_stats = (torch.log(i0), p_t * s1 + 0.5 * s2, s2 - s1.square())

    start = torch.where(one_sided, p, lo)  # the near end, or the left end across 0
    flat_stats = _flat_moments(
        torch.where(flat, start, -ones),
        torch.where(flat, length, 2 * ones),
        torch.where(flat, p, 0 * ones),
    )

    lo_x, hi_x = torch.where(across, lo, -2 * ones), torch.where(across, hi, 2 * ones)
    z = mass_across_zero(lo_x, hi_x)
    pdf_lo, pdf_hi = _pdf(lo_x), _pdf(hi_x)
    tilt = (lo_x * pdf_lo - hi_x * pdf_hi) / z
    across_stats = (
        torch.log(z) + _LOG_SQRT_2PI,
        0.5 + 0.5 * tilt,  # E[xi^2]/2, c = 0
        1.0 + tilt - ((pdf_lo - pdf_hi) / z).square(),
    )
    ls, excess, var = (
        torch.where(flat, f, torch.where(tail, t, x))
        for f, t, x in zip(flat_stats, tail_stats, across_stats, strict=True)
    )
    # H = -E[log density] = LS + E[(xi^2 - c^2)/2]  (density = exp(-(xi^2 - c^2)/2 - LS))
    return ls, ls + excess, var


def truncated_normal_log_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """``log((Phi(hi) - Phi(lo)) / phi(c))``, ``c`` the point of ``[lo, hi]`` nearest
    0: the log mass of the standard normal on ``[lo, hi]`` less its Gaussian factor
    ``-c^2/2 - log sqrt(2 pi)``, finite however far the interval lies in a tail."""
    return truncated_normal_stats(lo, hi, hi - lo)[0]


def truncated_normal_entropy(lo: Tensor, hi: Tensor) -> Tensor:
    """Differential entropy of the standard normal truncated to ``[lo, hi]``
    (where the textbook form cancels: ``log Z ~ -p^2/2`` against ``~ p^2/2``)."""
    return truncated_normal_stats(lo, hi, hi - lo)[1]


def truncated_normal_variance(lo: Tensor, hi: Tensor) -> Tensor:
    """Variance of the standard normal truncated to ``[lo, hi]`` (about ``1/p^2`` in
    a tail and ``L^2/12`` on a short interval, where the textbook form cancels)."""
    return truncated_normal_stats(lo, hi, hi - lo)[2]


# -- quantiles of a tail: the sampler's inversion ---------------------------------
def _log_mills(x: Tensor) -> Tensor:
    """``log m(x)`` for ``x >= 0`` (value only: the sampler's Newton iterations)."""
    return torch.log(_SQRT_HALF_PI * torch.special.erfcx(x * _SQRT_HALF))


def tail_quantile(p: Tensor, length: Tensor, u: Tensor) -> Tensor:
    """The ``u``-quantile ``s`` of ``exp(-p s - s^2/2)`` on ``[0, length]``, with the
    implicit (reparameterisation) gradient with respect to ``p`` and ``length``.

    Solves ``k(s) = log m(p + s) - log m(p) - p s - s^2/2 - log(1 - u I0/m(p)) = 0``
    (``k = log(1 - Phi(p + s)) + const``, concave and decreasing, ``k' = -1/m(p+s)``)
    by Newton's method from ``s = 0``: the first step is the exponential
    approximation, and from there the iterates decrease monotonically to the root.
    One last, differentiable Newton step at the root has the value of the root and
    the gradient ``-(dk/dparams) / k'`` of the implicit function theorem.
    """
    with torch.no_grad():
        p0, length0 = p.detach(), length.detach()
        log_m_p = _log_mills(p0)
        log_g_m_q = -0.5 * length0 * (2 * p0 + length0) + _log_mills(p0 + length0)
        i0 = torch.exp(log_m_p) - torch.exp(log_g_m_q)
        offset = log_m_p + torch.log1p(-u * i0 / torch.exp(log_m_p))
        s = torch.zeros_like(p0)
        for _ in range(NEWTON_STEPS):
            log_m_ps = _log_mills(p0 + s)
            k = log_m_ps - offset - p0 * s - 0.5 * s * s
            s = torch.minimum((s + k * torch.exp(log_m_ps)).clamp(min=0), length0)
    # the differentiable step: I0 = m(p) - g m(p + L) as in _tail_moments
    m_ps, m_p, m_q = mills_ratio(torch.stack([p + s, p, p + length]))[0]
    i0 = m_p - torch.exp(-0.5 * length * (2 * p + length)) * m_q
    k = torch.log(m_ps / m_p) - p * s - 0.5 * s * s - torch.log1p(-u * i0 / m_p)
    return (s + k * m_ps).clamp(min=0)
