"""Beta-Bernoulli gate: reference settings, test-time pruning, gradients, MC mode."""

from __future__ import annotations

import math

import pytest
import torch

import bbdrop
from bbdrop.gates import BetaBernoulliGate


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def kuma_mean(a: float, b: float) -> float:
    """b B(1 + 1/a, b) via math.lgamma, independent of the library's torch code."""
    return math.exp(
        math.log(b) + math.lgamma(1 + 1 / a) + math.lgamma(b) - math.lgamma(1 + 1 / a + b)
    )


def test_reference_defaults() -> None:
    gate = BetaBernoulliGate(10)
    assert (gate.alpha, gate.temperature, gate.threshold, gate.kl_scale) == (1e-4, 0.1, 1e-3, 1.0)
    torch.testing.assert_close(gate.a_raw, torch.full((10,), -1.0))
    torch.testing.assert_close(gate.b_raw, torch.full((10,), 0.5413), atol=1e-4, rtol=0)
    # docs/method.md section 1: a = 0.313, b = 1.0, so E_q[pi] starts at 0.24.
    torch.testing.assert_close(gate.a, torch.full((10,), softplus(-1.0)))
    torch.testing.assert_close(gate.b, torch.ones(10), atol=1e-4, rtol=0)
    expected = kuma_mean(softplus(-1.0), 1.0)
    assert abs(expected - 0.2385) < 5e-4
    torch.testing.assert_close(gate.expected_pi(), torch.full((10,), expected), atol=1e-5, rtol=0)


def test_every_setting_is_overridable() -> None:
    gate = BetaBernoulliGate(
        3, alpha=0.5, temperature=0.7, threshold=0.2, kl_scale=0.3, init_a=2.0, init_b=3.0
    )
    assert (gate.alpha, gate.temperature, gate.threshold, gate.kl_scale) == (0.5, 0.7, 0.2, 0.3)
    torch.testing.assert_close(gate.a, torch.full((3,), 2.0))
    torch.testing.assert_close(gate.b, torch.full((3,), 3.0))


def set_posterior(gate: BetaBernoulliGate, a: list[float], b: list[float]) -> None:
    inv = lambda v: v + math.log(-math.expm1(-v))  # noqa: E731  softplus^-1
    with torch.no_grad():
        gate.a_raw.copy_(torch.tensor([inv(v) for v in a]))
        gate.b_raw.copy_(torch.tensor([inv(v) for v in b]))


def test_eval_multiplies_by_expected_pi_and_zeroes_pruned_units_exactly() -> None:
    gate = BetaBernoulliGate(4, threshold=1e-3).eval()
    a, b = [1.0, 0.05, 2.0, 0.2], [1.0, 20.0, 0.5, 40.0]
    set_posterior(gate, a, b)
    means = [kuma_mean(ai, bi) for ai, bi in zip(a, b, strict=True)]
    keep = [m >= 1e-3 for m in means]
    assert keep == [True, False, True, False]  # the case this test is about
    x = torch.randn(7, 4) + 3.0
    y = gate(x)
    for k in range(4):
        if keep[k]:
            torch.testing.assert_close(y[:, k], x[:, k] * means[k], rtol=1e-4, atol=0)
        else:
            assert torch.equal(y[:, k], torch.zeros(7))
    assert gate.keep_mask().tolist() == keep
    assert gate.num_kept() == 2
    yc = gate(torch.randn(3, 4, 2, 2))
    assert torch.equal(yc[:, 1], torch.zeros(3, 2, 2)) and torch.equal(
        yc[:, 3], torch.zeros(3, 2, 2)
    )


def test_training_mask_is_relaxed_and_per_example() -> None:
    torch.manual_seed(0)
    gate = BetaBernoulliGate(50).train()
    z = gate(torch.ones(40, 50))
    assert ((z >= 0) & (z <= 1)).all()
    assert not torch.equal(z[0], z[1])  # masks differ between examples
    # tau = 0.1 makes the relaxed samples nearly binary (docs/method.md section 1).
    near_binary = ((z < 0.05) | (z > 0.95)).float().mean()
    assert near_binary > 0.8


@pytest.mark.slow
def test_mc_mode_mask_mean_matches_expected_pi() -> None:
    """Hard Bernoulli(pi), pi ~ Kumaraswamy: E[z] = E[pi]. pi is drawn once per
    forward pass, so 20000 passes of one example each: the standard error is at
    most 0.5/sqrt(20000) = 0.0035; we allow 5 standard errors."""
    torch.manual_seed(1)
    gate = BetaBernoulliGate(3).eval()
    a, b = [0.3133, 2.0, 0.8], [1.0, 3.0, 0.6]
    set_posterior(gate, a, b)
    gate.mc_sampling = True
    x = torch.ones(1, 3)
    with torch.no_grad():
        z = torch.cat([gate(x) for _ in range(20000)])
    for k in range(3):
        assert abs(z[:, k].mean().item() - kuma_mean(a[k], b[k])) < 5 * 0.0036


def test_gradients_reach_a_b_and_weights() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    net = bbdrop.attach_gates_(torch.nn.Sequential(layer))
    gate = net[0].gate
    loss = net(torch.randn(8, 5)).square().sum() + bbdrop.total_kl(net)
    loss.backward()
    for p in (gate.a_raw, gate.b_raw, layer.weight, layer.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_data_gradient_reaches_a_and_b_through_the_sample() -> None:
    """Without the KL, the pathwise gradient of the relaxed mask alone moves a and b.
    (At tau = 0.1 a saturated sigmoid can make single gradients underflow, so tau = 1.)"""
    torch.manual_seed(0)
    gate = BetaBernoulliGate(5, temperature=1.0, init_a=1.0, init_b=1.0).train()
    gate(torch.randn(16, 5)).square().sum().backward()
    assert gate.a_raw.grad.abs().min() > 0 and gate.b_raw.grad.abs().min() > 0


def test_kl_is_sum_of_closed_form_and_scale_applies_in_total_kl() -> None:
    from scipy.special import digamma

    gate = BetaBernoulliGate(2, alpha=1e-2, kl_scale=0.25)
    set_posterior(gate, [0.5, 3.0], [2.0, 0.7])
    c, g = 1e-2, 0.5772156649015329
    expected = sum(
        (1 - c / a) * (-g - digamma(b) - 1 / b) + math.log(a * b) - math.log(c) - (b - 1) / b
        for a, b in [(0.5, 2.0), (3.0, 0.7)]
    )
    assert gate.kl().item() == pytest.approx(expected, rel=1e-5)
    net = bbdrop.gate_layer_(torch.nn.Linear(2, 1), gate, "input")
    assert bbdrop.total_kl(net).item() == pytest.approx(0.25 * expected, rel=1e-5)


def test_posterior_and_prior_objects_give_the_same_kl() -> None:
    gate = BetaBernoulliGate(4)
    via_torch = torch.distributions.kl_divergence(gate.posterior(), gate.prior()).sum()
    torch.testing.assert_close(via_torch, gate.kl())
