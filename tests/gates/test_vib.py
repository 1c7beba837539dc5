"""VIB gate: the penalty against hand computations, the Gaussian-KL identity and finite
differences; the training noise by Monte Carlo; the pruning rule; float32 clamps;
training through bbdrop's loop."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.data import Dataset
from bbdrop.gates import get_gate_class
from bbdrop.gates.vib import (  # registers "vib"
    KL_EPS,
    LOGVAR_MAX,
    InformationBottleneckGate,
    vib_kl,
    vib_log_alpha,
    vib_test_values,
)
from bbdrop.threads import num_threads
from bbdrop.train.loop import build_optimizer, train_stage


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second thread only waits at barriers, for long on a busy machine
    (bbdrop.threads)."""
    with num_threads(1):
        yield


def set_params(gate: InformationBottleneckGate, mu: list[float], logvar: list[float]) -> None:
    with torch.no_grad():
        gate.mu.copy_(torch.tensor(mu, dtype=gate.mu.dtype))
        gate.logvar_raw.copy_(torch.tensor(logvar, dtype=gate.mu.dtype))


def hand_kl(mu: float, logvar: float) -> float:
    """0.5 log(1 + mu^2 / (sigma^2 + 1e-8)) with Python's math (BBcode vib.py:30)."""
    return 0.5 * math.log(1.0 + mu * mu / (math.exp(logvar) + 1e-8))


# -- settings -------------------------------------------------------------------------
def test_registered_with_reference_defaults() -> None:
    assert get_gate_class("vib") is InformationBottleneckGate
    gate = InformationBottleneckGate(3)
    assert (gate.kl_scale, gate.log_alpha_threshold) == (1.0, 0.0)
    assert KL_EPS == 1e-8
    exact = InformationBottleneckGate(3, init_std=0.0)
    assert torch.equal(exact.mu, torch.ones(3))
    assert torch.equal(exact.logvar, torch.full((3,), -9.0))


def test_initial_jitter_is_gaussian_with_std_0_01() -> None:
    """mu ~ N(1, 0.01^2), log sigma^2 ~ N(-9, 0.01^2) (VIBcode ib_layers.py:40-42).
    K = 40000: the standard error of the mean is 5e-5, that of the standard deviation
    3.5e-5; we allow 5 standard errors."""
    torch.manual_seed(0)
    gate = InformationBottleneckGate(40000)
    for p, centre in ((gate.mu, 1.0), (gate.logvar_raw, -9.0)):
        assert abs(p.mean().item() - centre) < 5 * 5e-5
        assert abs(p.std().item() - 0.01) < 5 * 3.5e-5


def test_every_setting_is_overridable() -> None:
    gate = InformationBottleneckGate(
        2, kl_scale=6.0, log_alpha_threshold=-1.5, init_mu=0.5, init_logvar=-4.0, init_std=0.0
    )
    assert (gate.kl_scale, gate.log_alpha_threshold) == (6.0, -1.5)
    assert torch.equal(gate.mu, torch.full((2,), 0.5))
    assert torch.equal(gate.logvar, torch.full((2,), -4.0))


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("kl_scale", -1.0),
        ("log_alpha_threshold", float("nan")),
        ("log_alpha_threshold", float("inf")),
        ("init_mu", float("nan")),
        ("init_logvar", LOGVAR_MAX + 1.0),
        ("init_logvar", float("-inf")),
        ("init_std", -0.01),
        ("init_std", True),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(arg: str, value: float) -> None:
    with pytest.raises(ValueError, match=arg):
        InformationBottleneckGate(4, **{arg: value})


# -- the penalty ----------------------------------------------------------------------
def test_penalty_matches_hand_computation() -> None:
    mu = [1.0, 0.0, -2.0, 0.3, 5.0]
    logvar = [-9.0, -3.0, 0.5, -19.0, 4.0]
    gate = InformationBottleneckGate(5).double()
    set_params(gate, mu, logvar)
    per_unit = vib_kl(gate.mu, gate.logvar)
    for k in range(5):
        assert per_unit[k].item() == pytest.approx(hand_kl(mu[k], logvar[k]), rel=1e-12)
    assert per_unit[1].item() == 0.0  # mu = 0: no information passes
    assert gate.kl().item() == pytest.approx(sum(map(hand_kl, mu, logvar)), rel=1e-12)
    # At the authors' initial values a unit costs 0.5 log(1 + 1/(e^-9 + 1e-8)) nats:
    # 0.5 (9 + log(1 + e^-9) - log(1 + 1e-8 e^9)) = 4.5000212 (float32 below)
    at_init = InformationBottleneckGate(784, init_std=0.0).kl().item()
    assert at_init == pytest.approx(784 * 4.5000212, rel=1e-6)
    assert hand_kl(1.0, -9.0) == pytest.approx(4.5000212, abs=1e-7)


def test_penalty_is_expected_kl_to_the_optimised_gaussian_prior() -> None:
    """baselines.md section 5: with h = z f, z ~ N(mu, s^2), and the prior variance
    xi^2 = (mu^2 + s^2) E f^2 (its optimum),
    E_f KL(N(mu f, s^2 f^2) || N(0, xi^2)) = 0.5 log(1 + mu^2/s^2) + 0.5 (log E f^2 - E log f^2).
    f takes three values, so the expectation is an exact sum; s^2 = sigma^2 + 1e-8."""
    f = torch.tensor([0.4, 1.0, 2.5], dtype=torch.float64)
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    ef2 = (p * f.square()).sum()
    for mu, logvar in [(1.0, -9.0), (-0.7, -1.0), (0.05, 0.3), (3.0, 2.0)]:
        s2 = math.exp(logvar) + KL_EPS
        xi2 = (mu * mu + s2) * ef2

        def expected_kl(prior_var: torch.Tensor, mu: float = mu, s2: float = s2) -> torch.Tensor:
            q = torch.distributions.Normal(mu * f, math.sqrt(s2) * f)
            prior = torch.distributions.Normal(prior_var.new_zeros(()), prior_var.sqrt())
            return (p * torch.distributions.kl_divergence(q, prior)).sum()

        constant = 0.5 * (ef2.log() - (p * f.square().log()).sum())
        penalty = vib_kl(*torch.tensor([mu, logvar], dtype=torch.float64))
        torch.testing.assert_close(expected_kl(xi2) - constant, penalty, rtol=1e-12, atol=1e-12)
        # xi^2 minimises the expected KL over the prior's variance
        assert expected_kl(xi2 * 1.05) > expected_kl(xi2) < expected_kl(xi2 / 1.05)


def test_penalty_gradient_matches_closed_form_and_finite_differences() -> None:
    mu = torch.tensor([1.0, -0.5, 0.0, 2e-4, 3.0, -1e-3], dtype=torch.float64)
    logvar = torch.tensor([-9.0, -2.0, -5.0, -18.0, 1.5, -25.0], dtype=torch.float64)
    mu.requires_grad_()
    logvar.requires_grad_()
    vib_kl(mu, logvar).sum().backward()
    v = logvar.detach().exp() + KL_EPS
    m = mu.detach()
    torch.testing.assert_close(mu.grad, m / (v + m.square()), rtol=1e-10, atol=0)
    d_logvar = -0.5 * m.square() * logvar.detach().exp() / (v * (v + m.square()))
    torch.testing.assert_close(logvar.grad, d_logvar, rtol=1e-10, atol=1e-300)
    assert torch.autograd.gradcheck(vib_kl, (mu, logvar), eps=1e-7, atol=1e-6, rtol=1e-5)


# -- the training noise ---------------------------------------------------------------
def test_training_noise_has_mean_mu_variance_sigma2_and_is_gaussian_per_example() -> None:
    """z_nk = mu_k + sigma_k eps_nk. With n = 200000 draws, the standard error of the
    mean is sigma/sqrt(n), that of the variance sigma^2 sqrt(2/n), that of a CDF value
    at most 0.5/sqrt(n) = 0.0011, that of a lag-1 correlation 1/sqrt(n); 5 of each."""
    torch.manual_seed(3)
    n = 200000
    mu, logvar = [0.5, -1.0, 0.0, 2.0], [0.0, -2.0, 1.0, -9.0]
    gate = InformationBottleneckGate(4).train()
    set_params(gate, mu, logvar)
    with torch.no_grad():
        z = gate(torch.ones(n, 4)).double()
    for k in range(4):
        sigma = math.exp(0.5 * logvar[k])
        assert abs(z[:, k].mean().item() - mu[k]) < 5 * sigma / math.sqrt(n)
        assert abs(z[:, k].var().item() - sigma**2) < 5 * sigma**2 * math.sqrt(2 / n)
        for t in (-1.0, 0.0, 1.5):  # P(z <= mu + t sigma) = Phi(t): Gaussian, signs included
            phi = 0.5 * (1 + math.erf(t / math.sqrt(2)))
            frac = (z[:, k] <= mu[k] + t * sigma).double().mean().item()
            assert abs(frac - phi) < 5 * 0.5 / math.sqrt(n)
        c = z[:, k] - z[:, k].mean()
        lag1 = (c[1:] * c[:-1]).mean() / c.var()
        assert abs(lag1.item()) < 5 / math.sqrt(n)  # a fresh draw per example
    assert (z[:, 0] < 0).any()  # Gaussian: no clipping at zero


def test_noise_is_shared_over_space_and_differs_between_examples_on_conv_input() -> None:
    torch.manual_seed(0)
    gate = InformationBottleneckGate(3, init_logvar=0.0).train()
    y = gate(torch.ones(5, 3, 4, 4))
    assert torch.equal(y, y[:, :, :1, :1].expand_as(y))
    assert torch.unique(y[:, 0, 0, 0]).numel() == 5


def test_pathwise_gradients_of_the_sample() -> None:
    """dz/dmu = 1, dz/dlog sigma^2 = (z - mu)/2: the reparameterised sample."""
    torch.manual_seed(1)
    gate = InformationBottleneckGate(3, init_logvar=-1.0).double().train()
    x = torch.ones(7, 3, dtype=torch.float64)
    z = gate(x)
    z.sum().backward()
    torch.testing.assert_close(gate.mu.grad, torch.full((3,), 7.0, dtype=torch.float64))
    half_eps_sigma = 0.5 * (z.detach() - gate.mu.detach()).sum(0)
    torch.testing.assert_close(gate.logvar_raw.grad, half_eps_sigma, rtol=1e-12, atol=1e-12)


# -- test time and pruning ------------------------------------------------------------
def test_pruning_rule_and_test_values_on_hand_built_parameters() -> None:
    """Keep iff log alpha = log sigma^2 - log(mu^2 + 1e-8) < 0; value mu, else exactly 0."""
    mu = [2.0, -0.5, 0.3, 1.0, 0.0, -3.0]
    logvar = [0.0, -1.0, -2.0, 0.5, -20.0, 3.0]
    gate = InformationBottleneckGate(6)
    set_params(gate, mu, logvar)
    log_alpha = [lv - math.log(m * m + 1e-8) for m, lv in zip(mu, logvar, strict=True)]
    torch.testing.assert_close(gate.log_alpha(), torch.tensor(log_alpha), rtol=1e-6, atol=1e-6)
    # log alpha: -1.39, 0.39, 0.41, 0.5, -1.58, 0.80
    keep_by_rule = [la < 0 for la in log_alpha]
    assert keep_by_rule == [True, False, False, False, True, False]
    values = gate.gate_values()
    assert values.tolist() == [2.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # exact
    # mu = 0 passes the rule but its test value is 0, so it is not a unit kept
    assert gate.keep_mask().tolist() == [True, False, False, False, False, False]
    assert gate.num_kept() == 1
    gate.eval()
    x = torch.randn(4, 6)
    assert torch.equal(gate(x), x * values)
    assert torch.equal(gate(x), gate(x))  # deterministic
    xc = torch.randn(2, 6, 3, 3)
    assert torch.equal(gate(xc), xc * values[:, None, None])
    # a higher threshold keeps the units whose log alpha lies below it
    loose = InformationBottleneckGate(6, log_alpha_threshold=0.45)
    set_params(loose, mu, logvar)
    assert loose.gate_values().tolist() == pytest.approx([2.0, -0.5, 0.3, 0.0, 0.0, 0.0])


def test_log_alpha_equal_to_the_threshold_prunes() -> None:
    mu = torch.tensor([0.7, -1.3, 2.0])
    logvar = torch.log(mu.square() + KL_EPS)  # the same float32 operations: log alpha = 0
    assert torch.equal(vib_log_alpha(mu, logvar), torch.zeros(3))
    assert torch.equal(vib_test_values(mu, logvar, 0.0), torch.zeros(3))
    assert torch.equal(vib_test_values(mu, logvar - 1e-3, 0.0), mu)


def test_prune_removes_units_for_good_in_every_mode() -> None:
    torch.manual_seed(0)
    gate = InformationBottleneckGate(4, init_std=0.0)
    gate.prune_(torch.tensor([True, False, True, True]))
    assert gate.keep_mask().tolist() == [True, False, True, True]
    assert gate.gate_values()[1].item() == 0.0
    gate.eval()
    gate.mc_sampling = True
    y = gate(torch.ones(50, 4))
    assert torch.equal(y[:, 1], torch.zeros(50))
    assert not torch.equal(y[0], y[1])  # mc mode samples


def test_mc_sampling_draws_from_the_posterior_and_keeps_pruned_units_off() -> None:
    """VIBcode's sample_in_testing: (mu + sigma eps) * mask. n = 100000, sigma = 0.5: the
    mean's standard error is 0.0016; we allow 5."""
    torch.manual_seed(2)
    gate = InformationBottleneckGate(2).eval()
    set_params(gate, [1.5, 0.1], [math.log(0.25), math.log(0.25)])  # unit 1: log alpha > 0
    gate.mc_sampling = True
    with torch.no_grad():
        z = gate(torch.ones(100000, 2))
    assert abs(z[:, 0].mean().item() - 1.5) < 5 * 0.5 / math.sqrt(100000)
    assert abs(z[:, 0].std().item() - 0.5) < 0.01
    assert torch.equal(z[:, 1], torch.zeros(100000))


# -- float32 at the clamps ------------------------------------------------------------
@pytest.mark.parametrize("mu", [0.0, 1e-30, -1.0, 1e6, -1e6])
@pytest.mark.parametrize("logvar", [-1e4, -100.0, -9.0, LOGVAR_MAX, 1e4])
@pytest.mark.parametrize("scale", [0.0, 1.0, 1e4])
def test_float32_values_and_gradients_are_finite(mu: float, logvar: float, scale: float) -> None:
    torch.manual_seed(0)
    gate = InformationBottleneckGate(3).train()
    set_params(gate, [mu] * 3, [logvar] * 3)
    x = (torch.randn(2, 3) * scale).requires_grad_()
    loss = gate(x).sum() + gate.kl()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(gate.mu.grad).all() and torch.isfinite(gate.logvar_raw.grad).all()
    assert torch.isfinite(gate.log_alpha()).all()
    gate.eval()
    assert torch.isfinite(gate(x)).all()
    assert torch.isfinite(gate.gate_values()).all()


def test_logvar_is_clamped_from_above_only() -> None:
    gate = InformationBottleneckGate(3)
    set_params(gate, [1.0, 1.0, 1.0], [1e4, LOGVAR_MAX, -1e4])
    assert gate.logvar.tolist() == [LOGVAR_MAX, LOGVAR_MAX, -1e4]
    kl = vib_kl(gate.mu, gate.logvar)
    assert kl[0].item() == kl[1].item() == pytest.approx(hand_kl(1.0, LOGVAR_MAX), rel=1e-5)
    # sigma -> 0: the 1e-8 bounds the penalty at 0.5 log(1 + 1e8)
    assert kl[2].item() == pytest.approx(0.5 * math.log1p(1e8), rel=1e-6)
    gate.kl().backward()
    assert gate.logvar_raw.grad[0].item() == 0.0  # beyond the clamp
    # below it, larger noise lowers the penalty (at the bound itself the gradient of
    # clamp is torch's choice: 2.13 passes it, 2.14 gives 0)
    inside = InformationBottleneckGate(1)
    set_params(inside, [1.0], [LOGVAR_MAX - 1.0])
    inside.kl().backward()
    assert inside.logvar_raw.grad[0].item() < 0


# -- through bbdrop ------------------------------------------------------------------
def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    )


def test_attach_total_kl_units_kept_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(conv_net(), "vib", kl_scale=6.0, conv_kl_scale=34.56)
    gates = [g.gate for _, g in bbdrop.gated_layers(net)]
    assert [(g.num_units, g.kl_scale) for g in gates] == [(3, 34.56), (48, 6.0), (5, 6.0)]
    expected = 34.56 * gates[0].kl() + 6.0 * (gates[1].kl() + gates[2].kl())
    torch.testing.assert_close(bbdrop.total_kl(net), expected)
    # bbdrop's kl_scale * penalty / N with kl_scale = gamma N is BBcode's gamma * penalty
    gamma, n = 1e-4, 60000
    dense = gates[1]
    dense.kl_scale = gamma * n
    assert dense.kl_scale == pytest.approx(6.0)
    torch.testing.assert_close(dense.kl_scale * dense.kl() / n, gamma * dense.kl())
    for batch in (1, 4):
        x = torch.randn(batch, 1, 6, 6)
        assert net.train()(x).shape == (batch, 2)
        assert net.eval()(x).shape == (batch, 2)
    with torch.no_grad():
        gates[1].mu[:10] = 0.0  # log alpha = -9 + 18.4 > 0: pruned
    assert bbdrop.units_kept(net) == {"0": 3, "3": 38, "5": 5}
    torch.manual_seed(1)
    other = bbdrop.attach_gates_(conv_net(), "vib", kl_scale=6.0)
    other.load_state_dict(net.state_dict())
    x = torch.randn(3, 1, 6, 6)
    assert torch.equal(other.eval()(x), net.eval()(x))
    assert bbdrop.units_kept(other) == bbdrop.units_kept(net)


@pytest.mark.parametrize("kind", ["zeros", "huge", "single"])
def test_training_steps_stay_finite_on_zero_huge_and_single_example_batches(kind: str) -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(conv_net(), "vib", kl_scale=6.0)
    opt, _ = build_optimizer(net, OptimConfig(), epochs=1)
    x = {"zeros": torch.zeros(8, 1, 6, 6), "huge": 1e4 * torch.randn(8, 1, 6, 6)}.get(
        kind, torch.randn(1, 1, 6, 6)
    )
    y = torch.randint(0, 2, (x.shape[0],))
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net.train()(x), y) + bbdrop.total_kl(net) / 100
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    assert torch.isfinite(net.eval()(x)).all()


@pytest.mark.slow
def test_train_stage_prunes_pure_noise_inputs_and_keeps_accuracy() -> None:
    """6 informative features (Gaussian blobs of 4 classes) and 14 of pure noise; 300 steps
    of bbdrop's loop with the authors' optimiser. The penalty drives mu of the noise
    inputs to 0, where log alpha >= 0 prunes them."""
    g = torch.Generator().manual_seed(0)
    classes, informative, noise, n = 4, 6, 14, 600
    centres = 3 * torch.randn(classes, informative, generator=g)

    def sample(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (m,), generator=g)
        x = torch.cat(
            [
                centres[y] + torch.randn(m, informative, generator=g),
                torch.randn(m, noise, generator=g),
            ],
            1,
        )
        return x, y

    data = Dataset.from_tensors(*sample(n), *sample(400), num_classes=classes)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(informative + noise, 32), nn.ReLU(), nn.Linear(32, classes))
    bbdrop.attach_gates_(net, "vib", kl_scale=1.0)
    gen = torch.Generator().manual_seed(1)
    history = train_stage(
        net,
        data.train_batches(50, gen),
        stage="vib",
        epochs=25,
        num_train=n,
        optim=OptimConfig(),
        evaluate_on=(data.test_x, data.test_y),
        generator=gen,
    )
    keep = net[0].gate.keep_mask()
    # over seeds 0-9: every noise input pruned; now and then one redundant blob feature too
    assert int(keep[:informative].sum()) >= informative - 1
    assert int(keep[informative:].sum()) <= 3
    assert history[0].units["0"] == informative + noise  # pruning happened while training
    assert history[-1].error <= 5.0
    assert history[-1].kl < history[0].kl
