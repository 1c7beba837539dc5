"""Structured Bayesian pruning (SBP): Neklyudov et al., NIPS 2017 (docs/baselines/sbp.md).

Unit k is multiplied by ``theta_k``, whose logarithm has the posterior
``N(mu_k, sigma_k^2)`` truncated to ``[a, b]``; the prior is log-uniform on
``[exp(a), exp(b)]``, i.e. uniform on ``log theta in [a, b]``. Training draws one
``theta`` per unit and minibatch, shared by all its examples; evaluation multiplies
unit k by ``E[theta_k]`` if its signal-to-noise ratio ``E[theta]/std[theta]`` exceeds
a threshold and by 0 otherwise.

Numerics. In the standard variable ``xi = (log theta - mu)/sigma`` the posterior is
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
every ``mu, log sigma`` inside the clamps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from bbdrop.gates.base import Gate, register_gate

__all__ = [
    "StructuredBayesianPruningGate",
    "mills_ratio",
    "sbp_kl",
    "sbp_log_moment",
    "sbp_log_rsample",
    "sbp_mean",
    "sbp_snr",
    "sbp_variance",
    "truncated_normal_entropy",
    "truncated_normal_log_mass",
    "truncated_normal_variance",
]


def _gauss_legendre(n: int) -> tuple[list[float], list[float]]:
    """Gauss-Legendre nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (0.5 * (x + 1.0)).tolist(), (0.5 * w).tolist()


# Clamps of mu and log sigma wherever they are used (SBPcode nets/layers.py:225-226;
# BBcode modules/sbp.py:80-81).
MU_MIN, MU_MAX = -20.0, 5.0
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -20.0, 5.0

# Ends of the interval of log theta: exp(+-80) is a normal float32, so that a kept unit's
# E[theta] >= exp(a) is never 0 (a unit is counted as kept by its non-zero value).
LOG_THETA_BOUND = 80.0

# Mills ratio: erfcx below CF_FROM, Laplace's continued fraction from there on, with
# enough terms for the dtype at CF_FROM (relative error of w = 1 - x t1 below 3e-8 with
# 14 terms, 1e-14 with 32; the error falls quickly as x grows).
CF_FROM = 4.0
CF_TERMS = {torch.float64: 32}
CF_TERMS_DEFAULT = 14
# SNR: below this sigma the variance comes from quadrature of the tilted variances
# (exact in the limit of small sigma), above it from the moments' closed forms.
SNR_QUADRATURE_BELOW = 1.0
_GL_NODES, _GL_WEIGHTS = _gauss_legendre(8)
# Quadrature of the truncated density over intervals where it is nearly flat.
_FLAT_NODES, _FLAT_WEIGHTS = _gauss_legendre(12)
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


def _across_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """``Phi(hi) - Phi(lo)`` for ``lo < 0 < hi``, as a sum (no cancellation)."""
    return 0.5 * (torch.erf(hi * _SQRT_HALF) - torch.erf(lo * _SQRT_HALF))


def _truncated_normal(lo: Tensor, hi: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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
    z = _across_mass(lo_x, hi_x)
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
    return _truncated_normal(lo, hi, hi - lo)[0]


def truncated_normal_entropy(lo: Tensor, hi: Tensor) -> Tensor:
    """Differential entropy of the standard normal truncated to ``[lo, hi]``
    (where the textbook form cancels: ``log Z ~ -p^2/2`` against ``~ p^2/2``)."""
    return _truncated_normal(lo, hi, hi - lo)[1]


def truncated_normal_variance(lo: Tensor, hi: Tensor) -> Tensor:
    """Variance of the standard normal truncated to ``[lo, hi]`` (about ``1/p^2`` in
    a tail and ``L^2/12`` on a short interval, where the textbook form cancels)."""
    return _truncated_normal(lo, hi, hi - lo)[2]


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
    (:func:`truncated_normal_entropy`).
    """
    _, alpha, beta, length = _standardise(mu, log_sigma, a, b)
    return math.log(b - a) - log_sigma - _truncated_normal(alpha, beta, length)[1]


def sbp_log_moment(mu: Tensor, log_sigma: Tensor, a: float, b: float, k: int = 1) -> Tensor:
    """``log E[theta^k]``, theta = exp(x), x ~ N(mu, sigma^2) truncated to [a, b].

    The closed form ``E[theta^k] = exp(k mu + k^2 sigma^2/2) (Phi(beta - k sigma) -
    Phi(alpha - k sigma)) / Z`` (SBPcode nets/layers.py:162-167) rearranged so that
    no large terms cancel: with ``xi_j`` the point of ``[alpha, beta]`` nearest
    ``j sigma`` and ``LS`` of :func:`truncated_normal_log_mass`::

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
        + _truncated_normal(alpha - ks, beta - ks, length)[0]
        - _truncated_normal(alpha, beta, length)[0]
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
    ls, _, var = _truncated_normal(alpha - shifts, beta - shifts, length.expand_as(shifts))
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


def _log_mills(x: Tensor) -> Tensor:
    """``log m(x)`` for ``x >= 0`` (value only: the sampler's Newton iterations)."""
    return torch.log(_SQRT_HALF_PI * torch.special.erfcx(x * _SQRT_HALF))


def _tail_offset(p: Tensor, length: Tensor, u: Tensor) -> Tensor:
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


def sbp_log_rsample(
    mu: Tensor, log_sigma: Tensor, a: float, b: float, u: Tensor | None = None
) -> Tensor:
    """One reparameterised draw of ``log theta`` per unit, by inversion of its CDF at
    ``u`` (uniform, drawn when not given, clamped to ``[eps, 1 - eps]``).

    Across 0 as the reference does, ``mu + sigma Phi^-1(Phi(alpha) + u Z)``
    (SBPcode nets/layers.py:204-208), without its clamp of ``Phi(alpha) + u Z`` to
    ``[1e-5, 1 - 1e-5]``, which returns ``log theta = b`` for every draw once ``Z``
    is below 1e-5; on one side of 0 from the near end, ``b - sigma s`` or
    ``a + sigma s`` with ``s`` of :func:`_tail_offset`.
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
    s = _tail_offset(p, torch.where(one_sided, length, 2 * ones), torch.where(at_b, 1 - u, u))
    tail = torch.where(at_b, b - sigma * s, a + sigma * s)
    lo_x, hi_x = torch.where(one_sided, -2 * ones, alpha), torch.where(one_sided, 2 * ones, beta)
    # below 1 in the dtype: ndtri(1) is inf, and its infinite derivative times the
    # zero gradient of the clamp below would be NaN
    level = torch.special.ndtr(lo_x) + u * _across_mass(lo_x, hi_x)
    xi = torch.special.ndtri(level.clamp(max=1.0 - eps / 2))
    across = mu + sigma * torch.clamp(xi, lo_x, hi_x)
    return torch.where(one_sided, tail, across).clamp(a, b)


# -- the gate ---------------------------------------------------------------------------
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
        _check_in("a", a, -LOG_THETA_BOUND, LOG_THETA_BOUND)
        _check_in("b", b, -LOG_THETA_BOUND, LOG_THETA_BOUND)
        if not a < b:
            raise ValueError(f"a must be < b (the interval of log theta), got a={a!r}, b={b!r}")
        if isinstance(threshold, bool) or not (
            isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0
        ):
            raise ValueError(f"threshold (an SNR) must be a finite number >= 0, got {threshold!r}")
        _check_in("init_mu", init_mu, MU_MIN, MU_MAX)
        _check_in("init_log_sigma", init_log_sigma, LOG_SIGMA_MIN, LOG_SIGMA_MAX)
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

    def mask(self, x: Tensor) -> Tensor:
        if self.training:  # one theta per unit, shared by the minibatch: (K,)
            return self.sample_theta()
        if self.mc_sampling:  # a posterior draw; pruned units stay pruned
            return self.sample_theta() * self.keep_mask()
        return self.gate_values()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, a={self.a}, b={self.b}, threshold={self.threshold}"


def _check_in(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high
    ):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
