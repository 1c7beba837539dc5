"""``import bbdrop`` registers KL( Kumaraswamy || Beta(c, 1) ) with torch.distributions.

Checked against the functional closed form (same numbers, same gradients) and,
independently, against quadrature of the defining integral.
"""

from __future__ import annotations

import math

import pytest
import torch
from lazy import module
from torch.distributions import Beta, Kumaraswamy, Normal, kl_divergence

import bbdrop  # noqa: F401  (registers the KL)
from bbdrop.gates.functional import kumaraswamy_beta_kl

integrate = module("scipy.integrate")

F64 = torch.float64


def kl_quad(a: float, b: float, c: float) -> float:
    """E_q[log q(X) - log p(X)] with X = (1 - v^(1/b))^(1/a), v ~ U(0, 1): the
    Kumaraswamy and Beta(c, 1) log densities written out, integrated over v."""

    def log_ratio(v: float) -> float:
        log_1m_xa = math.log(v) / b  # log(1 - x^a)
        log_x = math.log(-math.expm1(log_1m_xa)) / a
        log_q = math.log(a * b) + (a - 1.0) * log_x + (b - 1.0) * log_1m_xa
        log_p = math.log(c) + (c - 1.0) * log_x
        return log_q - log_p

    return integrate.quad(log_ratio, 0.0, 1.0, epsabs=0.0, epsrel=1e-12, limit=500)[0]


A = [0.05, math.log1p(math.exp(-1.0)), 1.0, 3.0, 50.0]
B = [0.2, 1.0, 1.0, 10.0, 50.0]
C = [1e-4, 1e-4, 1e-2, 1.0, 1e-4]


def test_kl_divergence_dispatches_to_closed_form():
    a, b, c = (torch.tensor(v, dtype=F64) for v in (A, B, C))
    got = kl_divergence(Kumaraswamy(a, b), Beta(c, torch.ones_like(c)))
    assert got.shape == (5,) and got.dtype == F64
    torch.testing.assert_close(got, kumaraswamy_beta_kl(a, b, c), rtol=0, atol=0)
    for k in range(5):  # and independently of the closed form (rel 1e-6: see
        # tests/gates/test_functional.py, where the references agree to 1e-10)
        assert got[k].item() == pytest.approx(kl_quad(A[k], B[k], C[k]), rel=1e-6)


def test_kl_divergence_broadcasts_prior_and_keeps_gradients():
    a = torch.tensor([0.3, 2.0], dtype=F64, requires_grad=True)
    b = torch.tensor([1.0, 5.0], dtype=F64, requires_grad=True)
    prior = Beta(torch.tensor(1e-4, dtype=F64), torch.tensor(1.0, dtype=F64))
    got = kl_divergence(Kumaraswamy(a, b), prior)
    assert got.shape == (2,)
    got.sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    kumaraswamy_beta_kl(a2, b2, 1e-4).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_kl_divergence_float32_reference_gate():
    """The BB gate's posterior()/prior() pair at its initial values, float32."""
    a = torch.full((3,), math.log1p(math.exp(-1.0)))
    got = kl_divergence(Kumaraswamy(a, torch.ones(3)), Beta(torch.full((3,), 1e-4), torch.ones(3)))
    assert got.dtype == torch.float32
    want = kl_quad(a[0].item(), 1.0, 1e-4)
    torch.testing.assert_close(got, torch.full((3,), want), rtol=1e-5, atol=0)


@pytest.mark.parametrize("concentration0", [[2.0, 2.0], [1.0, 0.5], [1.0 + 1e-6, 1.0]])
def test_beta_prior_with_concentration0_not_one_raises(concentration0):
    q = Kumaraswamy(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]))
    p = Beta(torch.tensor([0.1, 0.1]), torch.tensor(concentration0))
    with pytest.raises(NotImplementedError, match="concentration0"):
        kl_divergence(q, p)


def test_other_pairs_unaffected():
    """Registering the Kumaraswamy-Beta pair leaves torch's other KLs alone."""
    got = kl_divergence(Normal(1.0, 2.0), Normal(0.0, 1.0))
    assert got.item() == pytest.approx(math.log(1 / 2) + (4 + 1) / 2 - 0.5, rel=1e-6)
    with pytest.raises(NotImplementedError):
        kl_divergence(Beta(torch.tensor(1.0), torch.tensor(1.0)), Kumaraswamy(1.0, 1.0))
