"""Dependent beta-Bernoulli gate: phi, running statistics, run-time pruning, two stages."""

from __future__ import annotations

import math

import pytest
import torch

import bbdrop
from bbdrop.gates import BetaBernoulliGate, DependentBetaBernoulliGate


def test_reference_defaults() -> None:
    g = DependentBetaBernoulliGate(4)
    assert g.prior_std == pytest.approx(math.sqrt(5))
    assert g.phi_eps == 1e-10 and g.temperature == 0.1 and g.threshold == 1e-3
    torch.testing.assert_close(g.shift, torch.ones(4))
    torch.testing.assert_close(g.scale, torch.ones(4))
    torch.testing.assert_close(g.shift_std_raw, torch.full((4,), 0.5413), atol=1e-4, rtol=0)
    assert not g.bb_frozen


def reference_phi(h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, g) -> torch.Tensor:
    """docs/method.md section 2, written out: clamp(gamma (h - mu)/sigma + beta, eps, 1 - eps)."""
    pre = g.scale.detach() * (h - mean) / torch.sqrt(var + g.norm_eps) + g.shift.detach()
    return pre.clamp(g.phi_eps, 1 - g.phi_eps)


def test_eval_mask_is_expected_pi_times_phi_with_running_statistics() -> None:
    torch.manual_seed(0)
    g = DependentBetaBernoulliGate(5).eval()
    with torch.no_grad():
        g.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5]))
        g.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 1.0, 9.0]))
        g.scale.copy_(torch.tensor([0.3, -0.2, 0.1, 0.25, 0.4]))
        g.shift.copy_(torch.tensor([0.5, 0.4, 0.6, 0.5, 0.45]))
    x = torch.randn(64, 5) * 2
    phi = reference_phi(x, g.running_mean, g.running_var, g)
    z = g.gate_values()[None] * phi
    z = torch.where(z > g.threshold, z, torch.zeros_like(z))
    torch.testing.assert_close(g(x), x * z, rtol=1e-6, atol=1e-7)


def test_conv_input_is_global_average_pooled() -> None:
    torch.manual_seed(0)
    g = DependentBetaBernoulliGate(3).eval()
    with torch.no_grad():
        g.running_var.fill_(0.5)
        g.scale.fill_(0.4)
        g.shift.fill_(0.5)
    x = torch.randn(6, 3, 4, 4)
    phi = reference_phi(x.mean(dim=(2, 3)), g.running_mean, g.running_var, g)
    torch.testing.assert_close(g.phi(x), phi)
    z = g.gate_values() * phi
    z = z * (z > g.threshold)
    torch.testing.assert_close(g(x), x * z[:, :, None, None])


def test_training_uses_batch_statistics_and_updates_running_ones() -> None:
    torch.manual_seed(0)
    g = DependentBetaBernoulliGate(4, momentum=0.1).train()
    x = torch.randn(32, 4) * torch.tensor([1.0, 2.0, 3.0, 0.5]) + torch.tensor(
        [0.0, 1.0, -2.0, 5.0]
    )
    phi = g.phi(x, sample_shift=False)
    expected = reference_phi(x, x.mean(0), x.var(0, unbiased=False), g)
    torch.testing.assert_close(phi, expected)
    torch.testing.assert_close(g.running_mean, 0.1 * x.mean(0))
    torch.testing.assert_close(g.running_var, 0.9 + 0.1 * x.var(0, unbiased=True))


def test_a_batch_with_nan_or_inf_leaves_the_running_statistics_as_they_were() -> None:
    """Before the guard, one NaN example made both running statistics NaN for good and
    every later evaluation output NaN."""
    torch.manual_seed(0)
    g = DependentBetaBernoulliGate(3).train()
    g(torch.randn(16, 3))
    mean, var = g.running_mean.clone(), g.running_var.clone()
    bad = torch.randn(16, 3)
    bad[4, 0] = float("nan")  # unit 0 sees a NaN, unit 2 an inf, unit 1 is clean
    bad[7, 2] = float("inf")
    g(bad)
    assert torch.equal(g.running_mean[[0, 2]], mean[[0, 2]])
    assert torch.equal(g.running_var[[0, 2]], var[[0, 2]])
    torch.testing.assert_close(g.running_mean[1], 0.9 * mean[1] + 0.1 * bad[:, 1].mean())
    torch.testing.assert_close(g.running_var[1], 0.9 * var[1] + 0.1 * bad[:, 1].var())
    assert torch.isfinite(g.eval()(torch.randn(5, 3))).all()


def test_batch_of_one_in_training_leaves_running_variance_alone() -> None:
    g = DependentBetaBernoulliGate(4).train()
    x = torch.randn(1, 4, 3, 3)
    y = g(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(g.running_var, torch.ones(4))
    torch.testing.assert_close(g.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))


@pytest.mark.slow
def test_shift_noise_has_the_posterior_scale_and_is_shared_by_the_batch() -> None:
    """With the clamp out of the way, phi - its mean is N(0, s^2), one draw per
    call. 5000 calls: the sample std has relative standard error
    1/sqrt(2 * 5000) = 1%; we allow 4%."""
    torch.manual_seed(0)
    g = DependentBetaBernoulliGate(2).eval()
    with torch.no_grad():
        g.shift.fill_(0.5)
        g.shift_std_raw.fill_(math.log(math.expm1(0.05)))  # s = 0.05: clamp is 10 s away
    x = torch.zeros(3, 2)
    with torch.no_grad():
        d = torch.stack([g.phi(x, sample_shift=True) - g.phi(x) for _ in range(5000)])
    assert torch.equal(d[:, 0], d[:, 1]) and torch.equal(d[:, 0], d[:, 2])  # shared
    d = d[:, 0]  # (5000, 2)
    assert d.std(0).sub(0.05).abs().max() < 0.04 * 0.05
    assert d.mean(0).abs().max() < 4 * 0.05 / math.sqrt(5000)


def test_run_time_pruning_and_running_average_of_active_units() -> None:
    torch.manual_seed(0)
    g = DependentBetaBernoulliGate(4).eval()
    with torch.no_grad():
        g.scale.fill_(1.0)
        g.shift.fill_(0.0)  # phi = clamp(h, eps, 1 - eps) with running mean 0, var 1
    x1 = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-2.0, 0.7, 0.9, 3.0]])
    x2 = torch.tensor([[0.2, 0.2, -0.2, 0.2]])
    y1, y2 = g(x1), g(x2)
    z1 = g.gate_values() * reference_phi(x1, 0.0, torch.tensor(1.0), g)
    z2 = g.gate_values() * reference_phi(x2, 0.0, torch.tensor(1.0), g)
    # Units whose mask is <= threshold for an input are exactly zero for it.
    for y, z in ((y1, z1), (y2, z2)):
        assert torch.equal(y == 0, z <= g.threshold)
    active = (z1 > g.threshold).sum().item() + (z2 > g.threshold).sum().item()
    assert active == 8  # of 12 entries, the 4 with h <= 0 (so phi = eps) are pruned
    assert g.active_units() == pytest.approx(active / 3)
    net = bbdrop.gate_layer_(torch.nn.Linear(4, 1), g, "input")
    assert bbdrop.active_units(net) == {"": pytest.approx(active / 3)}
    bbdrop.reset_active_units(net)
    with pytest.raises(ValueError, match="eval mode"):
        g.active_units()


def test_phi_input_is_detached() -> None:
    """The authors feed h detached: d y / d x is the mask itself, nothing through phi."""
    g = DependentBetaBernoulliGate(6).train()
    x = torch.randn(10, 6, requires_grad=True)
    y = g(x)
    y.sum().backward()
    # y = x * mask, so d y / d x = mask exactly when nothing flows through phi
    torch.testing.assert_close(x.grad * x.detach(), y.detach())


def test_gradients_reach_every_parameter_and_the_weights() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(2, 4, 3)
    net = bbdrop.attach_gates_(torch.nn.Sequential(layer), "dbb")
    g = net[0].gate
    with torch.no_grad():  # keep phi inside the clamp so the shift gets gradient
        g.shift.fill_(0.5)
        g.shift_std_raw.fill_(-3.0)
    loss = net(torch.randn(8, 2, 6, 6)).square().sum() + bbdrop.total_kl(net)
    loss.backward()
    for name in ("a_raw", "b_raw", "scale", "shift", "shift_std_raw"):
        grad = getattr(g, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert layer.weight.grad.abs().sum() > 0


def test_kl_adds_the_gaussian_term() -> None:
    g = DependentBetaBernoulliGate(3, prior_std=2.0)
    with torch.no_grad():
        g.shift.copy_(torch.tensor([0.0, 1.0, -2.0]))
        g.shift_std_raw.copy_(torch.tensor([0.0, -1.0, 2.0]))
    s = torch.nn.functional.softplus(g.shift_std_raw.detach()).double()
    m = g.shift.detach().double()
    gauss = (torch.log(2.0 / s) + (s**2 + m**2) / (2 * 4.0) - 0.5).sum()
    bb = BetaBernoulliGate(3).kl().double()
    assert g.kl().item() == pytest.approx((bb + gauss).item(), rel=1e-5)


def test_from_gate_copies_the_bb_posterior_and_settings() -> None:
    bb = BetaBernoulliGate(5, alpha=1e-3, temperature=0.2, threshold=0.01, kl_scale=0.5)
    with torch.no_grad():
        bb.a_raw.normal_()
        bb.b_raw.normal_()
    bb.prune_(torch.tensor([True, True, False, True, True]))
    d = DependentBetaBernoulliGate.from_gate(bb)
    # the KL scale is the DBB stage's own (the authors' DBB stage: 1), not BB's
    assert (d.alpha, d.temperature, d.threshold, d.kl_scale) == (1e-3, 0.2, 0.01, 1.0)
    assert DependentBetaBernoulliGate.from_gate(bb, kl_scale=3.0).kl_scale == 3.0
    assert torch.equal(d.a_raw, bb.a_raw) and torch.equal(d.b_raw, bb.b_raw)
    assert d.static_keep.tolist() == [True, True, False, True, True]
    assert d.bb_frozen and not d.a_raw.requires_grad
    assert torch.equal(d.gate_values(), bb.gate_values())
    d2 = DependentBetaBernoulliGate.from_gate(bb, freeze_bb=False, prior_std=1.0)
    assert not d2.bb_frozen and d2.prior_std == 1.0
    with pytest.raises(TypeError, match="BetaBernoulliGate"):
        DependentBetaBernoulliGate.from_gate(torch.nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"DBB gate already.*re-initialise"):
        DependentBetaBernoulliGate.from_gate(d)


def test_frozen_bb_is_untouched_by_an_optimiser_step() -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(torch.nn.Sequential(torch.nn.Linear(6, 3)), "bb")
    net(torch.randn(4, 6)).sum().backward()  # a stale BB gradient from stage one
    bbdrop.convert_gates_(net, "dbb", freeze_bb=True)
    g = net[0].gate
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam(net.parameters(), lr=0.1, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (net(torch.randn(16, 6)).square().sum() + bbdrop.total_kl(net)).backward()
        opt.step()
    after = dict(net.named_parameters())
    for n in ("0.gate.a_raw", "0.gate.b_raw"):
        assert torch.equal(after[n], before[n]), n
    for n in ("0.gate.scale", "0.gate.shift", "0.gate.shift_std_raw", "0.weight"):
        assert not torch.equal(after[n], before[n]), n
    g.freeze_bb(False)
    assert g.a_raw.requires_grad and not g.bb_frozen


def test_dbb_never_keeps_a_unit_that_bb_pruned() -> None:
    bb = BetaBernoulliGate(3)
    with torch.no_grad():
        bb.b_raw.copy_(torch.tensor([0.5, 50.0, 0.5]))
        bb.a_raw.copy_(torch.tensor([-1.0, -10.0, -1.0]))
    assert bb.keep_mask().tolist() == [True, False, True]
    d = DependentBetaBernoulliGate.from_gate(bb).eval()
    y = d(torch.randn(100, 3) * 5)
    assert torch.equal(y[:, 1], torch.zeros(100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_phi_is_safe_logit_of_phi_in_value_and_gradient(dtype: torch.dtype) -> None:
    from bbdrop.gates.functional import safe_logit

    torch.manual_seed(0)
    g = DependentBetaBernoulliGate(5).to(dtype).train()
    x = torch.randn(40, 5, dtype=dtype) * 3
    torch.manual_seed(1)
    one_clamp = g.logit_phi(x, sample_shift=True)
    gf = torch.autograd.grad(one_clamp.sum(), [g.scale, g.shift, g.shift_std_raw])
    torch.manual_seed(1)
    plain = safe_logit(g.phi(x, sample_shift=True))
    gp = torch.autograd.grad(plain.sum(), [g.scale, g.shift, g.shift_std_raw])
    assert ((plain.abs() > 15).float().mean()) > 0.1  # the clamp is exercised
    torch.testing.assert_close(one_clamp, plain)
    for a, b in zip(gf, gp, strict=True):
        torch.testing.assert_close(a, b)
