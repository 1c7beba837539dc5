"""Structured Bayesian pruning: the truncated log-normal's KL, moments and sampler
against numerical quadrature of its density (tails included, float32 and float64),
the reference values of baselines.md section 3, and the gate through bbdrop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import bbdrop
import bbdrop.gates.sbp  # registers "sbp"
from bbdrop.config import OptimConfig
from bbdrop.data import Dataset
from bbdrop.gates.sbp import StructuredBayesianPruningGate
from bbdrop.gates.sbp_posterior import sbp_kl, sbp_log_rsample, sbp_mean, sbp_snr, sbp_variance
from bbdrop.gates.truncnorm import (
    CF_FROM,
    mills_ratio,
    truncated_normal_entropy,
    truncated_normal_log_mass,
    truncated_normal_variance,
)
from bbdrop.threads import num_threads
from bbdrop.train.loop import train_stage

A, B = -20.0, 0.0


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is fastest, and no slower beside busy neighbours."""
    with num_threads(1):
        yield


# -- independent reference: Simpson's rule on the density --------------------------------
def simpson(f: np.ndarray, dx: float) -> np.ndarray:
    """Composite Simpson's rule over the last axis (an odd number of points)."""
    return (
        dx / 3 * (f[..., 0] + f[..., -1] + 4 * f[..., 1:-1:2].sum(-1) + 2 * f[..., 2:-1:2].sum(-1))
    )


def window(mu: float, sigma: float, a: float, b: float) -> tuple[float, float, float]:
    """``(x_m, t_lo, t_hi)``: the mode ``x_m`` of the truncated density of log theta and
    the offsets from it between which all but ~exp(-800) of its mass lies."""
    x_m = min(max(mu, a), b)
    distance = abs(mu - x_m)
    scale = sigma if distance == 0 else min(sigma, sigma * sigma / distance)
    return x_m, max(a - x_m, -40 * scale), min(b - x_m, 40 * scale)


def quadrature(mu: float, log_sigma: float, a: float = A, b: float = B) -> dict[str, float]:
    """KL to the uniform prior, E[theta], Var[theta], SNR, and the grid (offsets t, CDF)
    of log theta ~ N(mu, sigma^2) truncated to [a, b], by Simpson's rule (4001 points)
    in the offset t = log theta - x_m from the mode, in float64. Nothing here shares
    code or formulas with the library: only the definition of the density."""
    sigma = math.exp(log_sigma)
    x_m, t_lo, t_hi = window(mu, sigma, a, b)
    t = np.linspace(t_lo, t_hi, 4001)
    dt = t[1] - t[0]
    log_f = -t * (t + 2 * (x_m - mu)) / (2 * sigma**2)  # log density + const, <= 0
    f = np.exp(log_f)
    norm = simpson(f, dt)
    q = f / norm
    entropy = math.log(norm) - simpson(q * log_f, dt)
    e1 = simpson(q * np.expm1(t), dt)  # E[theta] / e^x_m - 1
    e2 = simpson(q * np.expm1(t) ** 2, dt)
    mean = math.exp(x_m) * (1 + e1)
    var = math.exp(2 * x_m) * (e2 - e1**2)
    cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2 * dt)])
    return {
        "kl": math.log(b - a) - entropy,
        "mean": mean,
        "var": var,
        "snr": mean / math.sqrt(var),
        "x_m": x_m,
        "t": t,
        "cdf": cdf / cdf[-1],
    }


def quadrature_standard(lo: float, hi: float) -> tuple[float, float, float]:
    """``(log mass - log phi(c), entropy, variance)`` of N(0, 1) truncated to [lo, hi], c
    the point nearest 0, by Simpson's rule in the offset from c."""
    c, d_lo, d_hi = window(0.0, 1.0, lo, hi)
    d = np.linspace(d_lo, d_hi, 4001)
    log_f = -d * (d + 2 * c) / 2  # -(xi^2 - c^2)/2
    f = np.exp(log_f)
    norm = simpson(f, d[1] - d[0])
    q = f / norm
    mean = simpson(q * d, d[1] - d[0])
    var = simpson(q * (d - mean) ** 2, d[1] - d[0])
    return math.log(norm), math.log(norm) - simpson(q * log_f, d[1] - d[0]), var


def library(mu: float, log_sigma: float, dtype: torch.dtype, a: float = A, b: float = B) -> dict:
    m = torch.tensor([mu], dtype=dtype)
    s = torch.tensor([log_sigma], dtype=dtype)
    return {
        "kl": sbp_kl(m, s, a, b).item(),
        "mean": sbp_mean(m, s, a, b).item(),
        "var": sbp_variance(m, s, a, b).item(),
        "snr": sbp_snr(m, s, a, b).item(),
    }


# Every regime: interior, both tails (mu up to 5 beyond b, sigma down to e^-20, where
# the reference's Z underflows), nearly uniform (sigma up to e^5), the clamp corners.
GRID = [
    (mu, ls)
    for mu in (-20.0, -19.0, -10.0, -3.0, -1.0, 0.0, 0.1, 1.0, 2.0, 5.0)
    for ls in (-20.0, -8.0, -5.0, -2.0, -0.5, 0.0, 1.0, 3.0, 5.0)
]
# Another interval, where mu = -20 also lies far below a (the other tail), and a short
# one, where a wide posterior is nearly flat.
GRID_OTHER = [(mu, ls) for mu in (-20.0, -4.5, -1.0, 0.9, 5.0) for ls in (-12.0, -3.0, 0.0, 4.0)]
GRID_SHORT = [(mu, ls) for mu in (-20.0, -0.3, 0.0, 5.0) for ls in (-6.0, -1.0, 2.0, 5.0)]
# float32: KL to 2e-5 absolute (it is log(b - a) - log sigma - H, ~1e-5 where sigma ~ e^5),
# E to 1e-5 and Var, SNR to 2e-4 relative (quadrature in float32 would do far worse).
TOLERANCES = {
    torch.float64: {"kl": (1e-8, 1e-9), "mean": (1e-9, 0), "var": (1e-7, 0), "snr": (1e-7, 0)},
    torch.float32: {"kl": (1e-5, 2e-5), "mean": (1e-5, 0), "var": (2e-4, 0), "snr": (2e-4, 0)},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("interval", "grid"),
    [((A, B), GRID), ((-4.0, 1.0), GRID_OTHER), ((-0.5, 0.0), GRID_SHORT)],
    ids=["default", "other", "short"],
)
def test_kl_and_moments_match_quadrature_everywhere(
    dtype: torch.dtype, interval: tuple[float, float], grid: list[tuple[float, float]]
) -> None:
    a, b = interval
    bad = []
    for mu, ls in grid:
        ref, got = quadrature(mu, ls, a, b), library(mu, ls, dtype, a, b)
        for key, (rtol, atol) in TOLERANCES[dtype].items():
            if not abs(got[key] - ref[key]) <= atol + rtol * abs(ref[key]):
                bad.append((mu, ls, key, got[key], ref[key]))
    assert not bad, bad


def test_the_quadrature_itself_reproduces_the_closed_form_where_that_is_safe() -> None:
    """The reference's closed forms (baselines.md section 3) in float64, where Z is not
    small, against the quadrature: the test's own yardstick is right. (Even here the
    masses must be differences of upper tails on the right of 0, or they cancel.)"""

    def mass(lo: float, hi: float) -> float:  # Phi(hi) - Phi(lo)
        if lo > 0:
            return 0.5 * (math.erfc(lo / math.sqrt(2)) - math.erfc(hi / math.sqrt(2)))
        return 0.5 * (math.erfc(-hi / math.sqrt(2)) - math.erfc(-lo / math.sqrt(2)))

    def pdf(v: float) -> float:
        return math.exp(-v * v / 2) / math.sqrt(2 * math.pi)

    for mu, ls in [(0.0, 0.0), (-3.0, 1.0), (-1.0, 0.5), (-10.0, 2.0)]:
        s = math.exp(ls)
        al, be = (A - mu) / s, (B - mu) / s
        z = mass(al, be)
        kl = math.log(B - A) - 0.5 * math.log(2 * math.pi * math.e) - ls - math.log(z)
        kl -= (al * pdf(al) - be * pdf(be)) / (2 * z)
        e1 = math.exp(mu + s * s / 2) * mass(al - s, be - s) / z
        e2 = math.exp(2 * mu + 2 * s * s) * mass(al - 2 * s, be - 2 * s) / z
        ref = quadrature(mu, ls)
        assert abs(ref["kl"] - kl) < 1e-10
        assert abs(ref["mean"] / e1 - 1) < 1e-10
        assert abs(ref["var"] / (e2 - e1 * e1) - 1) < 1e-9


# baselines.md section 3, "Checks (float64)" 1 and 2.
KL_VALUES = [
    ((0.0, -5.0), 7.2699409),
    ((0.0, 0.0), 2.2699409),
    ((-1.0, 0.5), 1.5326416),
    ((-3.0, 1.0), 0.8600759),
    ((-10.0, 2.0), 0.0325165),
]
MOMENT_VALUES = [
    ((0.0, 0.0), 0.52315658, 2.0924390),
    ((-3.0, 1.0), 0.12314398, 0.61547416),
    ((-19.0, 0.0), 1.07296e-8, 0.8477313),
    ((2.0, -2.0), 0.991005, 111.6536),  # where the naive formula returns NaN
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_values_of_baselines_md(dtype: torch.dtype) -> None:
    for (mu, ls), kl in KL_VALUES:
        assert library(mu, ls, dtype)["kl"] == pytest.approx(
            kl, abs=2e-7 if dtype == torch.float64 else 2e-5
        )
    for (mu, ls), mean, snr in MOMENT_VALUES:
        got = library(mu, ls, dtype)
        assert got["mean"] == pytest.approx(mean, rel=5e-6)
        assert got["snr"] == pytest.approx(snr, rel=5e-6 if dtype == torch.float64 else 1e-4)


def test_the_reference_formulas_fail_where_these_do_not() -> None:
    """In float32, the reference's Z = Phi(beta) - Phi(alpha) underflows to 0 once mu is
    0.1 beyond b at the initial sigma (log Z = -inf, KL = inf), and its
    exp(log erfc(x) + x^2) form of erfcx returns 0 at x = 30 (true value 0.0188)."""
    mu, ls = torch.tensor([0.1]), torch.tensor([-5.0])
    sigma = ls.exp()
    z = torch.special.ndtr((B - mu) / sigma) - torch.special.ndtr((A - mu) / sigma)
    assert z.item() == 0.0
    assert (torch.log(torch.erfc(torch.tensor(30.0))) + 900.0).exp().item() == 0.0
    ref = quadrature(0.1, -5.0)
    assert sbp_kl(mu, ls, A, B).item() == pytest.approx(ref["kl"], rel=1e-6)
    assert sbp_snr(mu, ls, A, B).item() == pytest.approx(ref["snr"], rel=1e-4)


# -- the standard-normal pieces ------------------------------------------------------
def test_mills_ratio_and_its_tails_match_quadrature() -> None:
    """m(x) = int_0^inf exp(-x s - s^2/2) ds, t1 = E[s], w = E[s^2] under that density,
    on both sides of the switch to the continued fraction and far out."""
    xs = [0.0, 0.5, 2.0, CF_FROM - 1e-9, CF_FROM, CF_FROM + 1e-9, 10.0, 1e3, 1e6]
    # float32: below CF_FROM, w = 1 - x (1/m - x) loses up to ~x^4/2 ulps (3e-5 at x = 4)
    for dtype, rtol in [(torch.float64, 1e-11), (torch.float32, 5e-5)]:
        m, t1, w = mills_ratio(torch.tensor(xs, dtype=dtype))
        for i, x in enumerate(xs):
            s = np.linspace(0.0, min(12.0, 40.0 / max(x, 1e-9)), 16001)
            f = np.exp(-x * s - s * s / 2)
            norm = simpson(f, s[1] - s[0])
            ref = (norm, simpson(f * s, s[1] - s[0]) / norm, simpson(f * s * s, s[1] - s[0]) / norm)
            for got, want in zip((m[i], t1[i], w[i]), ref, strict=True):
                assert got.item() == pytest.approx(want, rel=rtol), (dtype, x)


@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        (-1.0, 2.0),  # across 0
        (-0.3, 0.2),  # short, across 0
        (0.5, 3.0),  # one side, near
        (-9.0, -6.0),  # one side, tail
        (-1e6, -1e3),  # far tail
        (1e3, 1e3 + 1e-2),  # far out and short: nearly flat
        (-12.0, 12.0),  # wide
        (2.0, 2.001),  # short: nearly flat, where the closed forms cancel
        (-0.01, 0.005),  # short, across 0
        (-30.0, -29.99),  # short, in a tail
    ],
)
def test_truncated_standard_normal_matches_quadrature(lo: float, hi: float) -> None:
    ref = quadrature_standard(lo, hi)
    for dtype, rtol, atol in [(torch.float64, 1e-9, 1e-12), (torch.float32, 5e-5, 2e-6)]:
        lo_t, hi_t = torch.tensor([lo], dtype=dtype), torch.tensor([hi], dtype=dtype)
        got = (
            truncated_normal_log_mass(lo_t, hi_t).item(),
            truncated_normal_entropy(lo_t, hi_t).item(),
            truncated_normal_variance(lo_t, hi_t).item(),
        )
        for g, r in zip(got, ref, strict=True):
            assert g == pytest.approx(r, rel=rtol, abs=atol), (dtype, got, ref)


# -- gradients -------------------------------------------------------------------------
GRAD_POINTS = [(0.0, -5.0), (-3.0, 1.0), (2.0, -2.0), (5.0, -12.0), (-19.5, -8.0), (0.05, 4.9)]


def test_kl_and_moment_gradients_pass_gradcheck_in_every_regime() -> None:
    mu = torch.tensor([p[0] for p in GRAD_POINTS], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([p[1] for p in GRAD_POINTS], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, s: sbp_kl(m, s, A, B), (mu, ls))
    assert torch.autograd.gradcheck(lambda m, s: sbp_mean(m, s, A, B), (mu, ls))


def test_kl_gradient_matches_finite_differences_of_the_quadrature() -> None:
    """Five-point differences of the quadrature KL, with the step in mu a hundredth of
    sigma (the scale on which the KL changes), against autograd."""

    def derivative(f, h: float) -> float:
        return (f(-2 * h) - 8 * f(-h) + 8 * f(h) - f(2 * h)) / (12 * h)

    for mu, ls in [(0.0, -5.0), (2.0, -2.0), (5.0, -5.0), (-10.0, 2.0)]:
        h = 1e-2 * min(1.0, math.exp(ls))
        d_mu = derivative(lambda e, mu=mu, ls=ls: quadrature(mu + e, ls)["kl"], h)
        d_ls = derivative(lambda e, mu=mu, ls=ls: quadrature(mu, ls + e)["kl"], 1e-2)
        for dtype, rtol in [(torch.float64, 1e-6), (torch.float32, 1e-4)]:
            m = torch.tensor([mu], dtype=dtype, requires_grad=True)
            s = torch.tensor([ls], dtype=dtype, requires_grad=True)
            g_mu, g_ls = torch.autograd.grad(sbp_kl(m, s, A, B).sum(), (m, s))
            assert g_mu.item() == pytest.approx(d_mu, rel=rtol, abs=1e-6), (mu, ls, dtype)
            assert g_ls.item() == pytest.approx(d_ls, rel=rtol, abs=1e-6), (mu, ls, dtype)


def test_everything_is_finite_at_and_beyond_the_clamps_in_float32() -> None:
    torch.manual_seed(0)
    values = [-1e4, -20.0, -19.9, -5.0, 0.0, 1e-3, 4.99, 5.0, 1e4]
    raw_mu, raw_ls = torch.tensor([[m, s] for m in values for s in values]).T
    gate = StructuredBayesianPruningGate(len(raw_mu)).train()
    with torch.no_grad():
        gate.mu.copy_(raw_mu)
        gate.log_sigma.copy_(raw_ls)
    x = torch.randn(3, len(raw_mu)).requires_grad_()
    loss = gate(x).square().sum() + gate.kl()
    loss.backward()
    for t in (loss, x.grad, gate.mu.grad, gate.log_sigma.grad, gate.snr(), gate.gate_values()):
        assert torch.isfinite(t).all()
    mu, ls = gate.clamped()
    for fn in (sbp_kl, sbp_mean, sbp_variance, sbp_snr):
        # the SNR and variance are test-time statistics; their float32 gradients may
        # overflow where the SNR passes ~1e14 (their float64 ones are finite)
        for dtype in (torch.float32,) if fn in (sbp_kl, sbp_mean) else (torch.float64,):
            m = mu.detach().to(dtype).requires_grad_()
            s = ls.detach().to(dtype).requires_grad_()
            out = fn(m, s, A, B)
            assert torch.isfinite(out).all(), fn.__name__
            assert torch.isfinite(fn(m.float(), s.float(), A, B)).all(), fn.__name__
            grads = torch.autograd.grad(out.sum(), (m, s))
            assert all(torch.isfinite(g).all() for g in grads), fn.__name__


# -- the sampler ----------------------------------------------------------------------------
SAMPLER_CASES = [(0.0, -5.0), (-3.0, 1.0), (2.0, -2.0), (5.0, -5.0), (-19.0, 0.0), (3.0, 4.0)]


@pytest.mark.parametrize(("mu", "ls"), SAMPLER_CASES)
def test_samples_follow_the_truncated_log_normal(mu: float, ls: float) -> None:
    """Kolmogorov-Smirnov against the quadrature CDF (n = 4000; the 0.1% critical value
    1.95/sqrt(n)), the range [e^a, e^b], and the mean within 4 standard errors."""
    gen = torch.Generator().manual_seed(0)
    n = 4000
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    x = sbp_log_rsample(
        torch.full((n,), mu, dtype=torch.float64),
        torch.full((n,), ls, dtype=torch.float64),
        A,
        B,
        u,
    )
    assert (x >= A).all() and (x <= B).all()
    ref = quadrature(mu, ls)
    cdf = np.interp(np.sort(x.numpy()) - ref["x_m"], ref["t"], ref["cdf"])
    ecdf = np.arange(1, n + 1) / n
    assert np.max(np.maximum(ecdf - cdf, cdf - (ecdf - 1 / n))) < 1.95 / math.sqrt(n)
    theta = x.exp()
    assert abs(theta.mean().item() - ref["mean"]) < 4 * math.sqrt(ref["var"] / n)
    x32 = sbp_log_rsample(torch.full((n,), mu), torch.full((n,), ls), A, B, u.float())
    assert torch.isfinite(x32).all() and (x32 >= A).all() and (x32 <= B).all()
    torch.testing.assert_close(x32.exp().double(), theta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("mu", "ls"), SAMPLER_CASES)
def test_reparameterised_gradient_is_that_of_the_mean(mu: float, ls: float) -> None:
    """d E[theta] / d(mu, log sigma) = E[d theta(u) / d(mu, log sigma)]: the midpoint rule
    over u (n = 4000) of the sampler's gradients against the gradient of E[theta]."""
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    m = torch.full((n,), mu, dtype=torch.float64, requires_grad=True)
    s = torch.full((n,), ls, dtype=torch.float64, requires_grad=True)
    g_m, g_s = torch.autograd.grad(sbp_log_rsample(m, s, A, B, u).exp().sum(), (m, s))
    m1 = torch.tensor([mu], dtype=torch.float64, requires_grad=True)
    s1 = torch.tensor([ls], dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(sbp_mean(m1, s1, A, B).sum(), (m1, s1))
    scale = math.sqrt(quadrature(mu, ls)["var"])
    for got, ref in zip((g_m.mean(), g_s.mean()), want, strict=True):
        assert abs(got.item() - ref.item()) <= 2e-3 * (abs(ref.item()) + scale)


# -- the gate -------------------------------------------------------------------------------
def make(values: list[tuple[float, float]], **kwargs: float) -> StructuredBayesianPruningGate:
    gate = StructuredBayesianPruningGate(len(values), **kwargs)
    with torch.no_grad():
        gate.mu.copy_(torch.tensor([v[0] for v in values]))
        gate.log_sigma.copy_(torch.tensor([v[1] for v in values]))
    return gate


def test_reference_defaults() -> None:
    gate = bbdrop.create_gate("sbp", 7)
    assert isinstance(gate, StructuredBayesianPruningGate)
    assert (gate.a, gate.b, gate.threshold, gate.kl_scale) == (-20.0, 0.0, 1.0, 1.0)
    assert torch.equal(gate.mu, torch.zeros(7))
    assert torch.equal(gate.log_sigma, torch.full((7,), -5.0))
    # at the start every unit is kept, at E[theta] = 0.9946 and SNR 247 (quadrature)
    ref = quadrature(0.0, -5.0)
    torch.testing.assert_close(gate.gate_values(), torch.full((7,), ref["mean"]), rtol=1e-5, atol=0)
    assert gate.num_kept() == 7
    gate = StructuredBayesianPruningGate(
        3, a=-4, b=1, threshold=0.5, kl_scale=40, init_mu=-1, init_log_sigma=0
    )
    assert (gate.a, gate.b, gate.threshold, gate.kl_scale) == (-4.0, 1.0, 0.5, 40.0)
    assert torch.equal(gate.mu, torch.full((3,), -1.0))
    assert torch.equal(gate.log_sigma, torch.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"a": 0.0}, "a must be < b"),
        ({"a": 1.0, "b": 0.5}, "a must be < b"),
        ({"a": -100.0}, "a must be"),
        ({"b": float("inf")}, "b must be"),
        ({"b": float("nan")}, "b must be"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"init_mu": 6.0}, "init_mu"),
        ({"init_log_sigma": -21.0}, "init_log_sigma"),
        ({"kl_scale": -1.0}, "kl_scale"),
        ({"a": True}, "a must be"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        StructuredBayesianPruningGate(4, **kwargs)


def test_eval_value_is_mean_times_snr_mask_exactly_zero_when_pruned() -> None:
    values = [(0.0, -5.0), (-3.0, 1.0), (-19.0, 0.0), (0.0, 0.0), (2.0, -2.0)]
    gate = make(values).eval()
    refs = [quadrature(mu, ls) for mu, ls in values]
    keep = [r["snr"] > 1.0 for r in refs]
    assert keep == [True, False, False, True, True]  # the case this test is about
    values_t = gate.gate_values()
    for v, r, k in zip(values_t.tolist(), refs, keep, strict=True):
        assert v == (pytest.approx(r["mean"], rel=1e-5) if k else 0.0)
    assert torch.equal(gate.keep_mask(), torch.tensor(keep))
    assert gate.num_kept() == 3
    x = torch.randn(4, 5)
    torch.testing.assert_close(gate(x), x * values_t, rtol=0, atol=0)
    torch.testing.assert_close(gate(x), gate(x), rtol=0, atol=0)
    # the threshold is strict (SBPcode: snr > threshold), and the count follows it
    gate.threshold = gate.snr()[0].item()
    assert not gate.keep_mask()[0] and gate.gate_values()[0] == 0


def test_prune_removes_units_for_good_and_counts_follow() -> None:
    gate = make([(0.0, -5.0)] * 4).eval()
    gate.prune_(torch.tensor([True, False, True, True]))
    assert gate.gate_values()[1] == 0 and gate.num_kept() == 3
    assert (
        bbdrop.units_kept(nn.Sequential(bbdrop.gate_layer_(nn.Linear(4, 2), gate, "input")))["0"]
        == 3
    )
    gate.mc_sampling = True
    y = gate(torch.ones(6, 4))
    assert (y[:, 1] == 0).all() and (y[:, [0, 2, 3]] > 0).all()


def test_training_draws_one_theta_per_unit_shared_by_the_batch_and_over_space() -> None:
    torch.manual_seed(0)
    gate = make([(-3.0, 1.0), (0.0, 0.0), (2.0, -2.0)]).train()
    y = gate(torch.ones(5, 3))
    assert torch.equal(y, y[:1].expand_as(y))
    assert ((y >= math.exp(A)) & (y <= math.exp(B))).all()
    z = gate(torch.ones(5, 3, 4, 4))
    assert torch.equal(z, z[:1, :, :1, :1].expand_as(z))
    assert not torch.equal(y[0], z[0, :, 0, 0])  # a fresh draw per step
    gate.eval()
    gate.mc_sampling = True  # eval-mode posterior draws: also one per unit and batch
    w = gate(torch.ones(5, 3))
    assert torch.equal(w, w[:1].expand_as(w)) and not torch.equal(w[0], gate.gate_values())


def test_kl_is_the_sum_of_units_and_total_kl_applies_each_gates_scale() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    )
    bbdrop.attach_gates_(net, "sbp", conv_kl_scale=40.0)
    net[2].gate.kl_scale = 16.0  # the LeNet5 "scale" config: 40 and 16 on the convolutions
    gates = [net[0].gate, net[2].gate, net[4].gate]
    assert [g.num_units for g in gates] == [3, 4, 4 * 4 * 4]
    with torch.no_grad():
        for g in gates:
            g.mu.uniform_(-3, 1)
            g.log_sigma.uniform_(-4, 1)
    kls = [
        sum(
            quadrature(m, s)["kl"] for m, s in zip(g.mu.tolist(), g.log_sigma.tolist(), strict=True)
        )
        for g in gates
    ]
    for g, k in zip(gates, kls, strict=True):
        assert g.kl().item() == pytest.approx(k, rel=1e-5)
    assert bbdrop.total_kl(net).item() == pytest.approx(
        40 * kls[0] + 16 * kls[1] + kls[2], rel=1e-5
    )
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    net.eval()
    assert set(bbdrop.units_kept(net)) == {"0", "2", "4"}


def test_state_dict_round_trip_and_float64() -> None:
    src = make([(0.3, -2.0), (-4.0, 1.5), (1.0, -1.0)])
    src.prune_(torch.tensor([True, True, False]))
    dst = StructuredBayesianPruningGate(3)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 3)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)
    gate64 = dst.double()
    assert gate64(x.double()).dtype == torch.float64 and gate64.kl().dtype == torch.float64
    gate64.train()
    assert gate64(x.double()).dtype == torch.float64


@pytest.mark.parametrize("kind", ["zeros", "huge", "single"])
def test_training_steps_on_zero_huge_and_single_example_batches(kind: str) -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), "sbp")
    x = {"zeros": torch.zeros(4, 6), "huge": 1e4 * torch.randn(4, 6), "single": torch.randn(1, 6)}[
        kind
    ]
    y = torch.zeros(x.shape[0], dtype=torch.long)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y) + bbdrop.total_kl(net) / 100
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
    net.eval()
    assert torch.isfinite(net(x)).all()


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 Gaussian blobs in 3 informative features, then 13 features of pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    informative = 2.0 * torch.eye(3)[y] + 0.5 * torch.randn(n, 3, generator=g)
    return torch.cat([informative, torch.randn(n, 13, generator=g)], 1), y


@pytest.mark.slow
def test_train_stage_prunes_pure_noise_inputs_and_keeps_accuracy() -> None:
    """300 steps of train_stage (batch 50, N = 600) with the gates' rate raised from the
    reference's 1e-2 to 5e-2, so that the posterior of the useless inputs can travel
    from the initial (0, -5) to SNR < 1 within the short budget."""
    x, y = blobs(600, 0)
    x_test, y_test = blobs(300, 1)
    data = Dataset.from_tensors(x, y, x_test, y_test, 3)
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)), "sbp")
    gen = torch.Generator().manual_seed(0)
    history = train_stage(
        net,
        data.train_batches(50, gen),
        stage="sbp",
        epochs=25,
        num_train=600,
        optim=OptimConfig(gate_lr=5e-2),
        evaluate_on=(x_test, y_test),
        generator=gen,
    )
    keep = net[0].gate.keep_mask()
    assert keep[:3].all()  # every informative input survives
    assert int((~keep[3:]).sum()) >= 10  # most pure-noise inputs are pruned
    assert history[-1].units["0"] == int(keep.sum())
    assert history[-1].error <= 5.0


def test_sampler_is_finite_with_finite_gradients_at_the_ends_of_u() -> None:
    """u = 0 and u = 1 (clamped to [eps, 1 - eps]) in every regime, float32: no inf from
    Phi^-1(1) or log(0), and no NaN gradient from them."""
    points = [
        (mu, ls) for mu in (-20.0, -19.0, -10.0, 0.0, 0.5, 5.0) for ls in (-20.0, -5.0, 0.0, 5.0)
    ]
    # just above a with sigma ~ 1.8: Phi(alpha) + u Z rounds to 1 for u = 1 - eps
    points += [(-19.999 + 1e-3 * i, 0.6125) for i in range(40)]
    for u_end in (0.0, 1e-9, 0.5, 1.0 - 1e-9, 1.0):
        m = torch.tensor([p[0] for p in points], requires_grad=True)
        s = torch.tensor([p[1] for p in points], requires_grad=True)
        x = sbp_log_rsample(m, s, A, B, torch.full((len(points),), u_end))
        assert torch.isfinite(x).all() and (x >= A).all() and (x <= B).all()
        grads = torch.autograd.grad(x.exp().sum(), (m, s))
        assert all(torch.isfinite(g).all() for g in grads), u_end
