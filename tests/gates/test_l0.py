"""Hard-concrete L0 gate: the sampler against closed forms by Monte-Carlo, the penalty
against hand computation, test-time values, float32 extremes, attach and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import bbdrop
import bbdrop.gates.l0  # registers "l0"
from bbdrop.config import OptimConfig
from bbdrop.data.datasets import Dataset
from bbdrop.gates.l0 import (
    HardConcreteGate,
    hard_concrete_cdf,
    hard_concrete_prob_nonzero,
    hard_concrete_prob_one,
    hard_concrete_rsample,
    hard_concrete_test_value,
    l0_penalty,
)
from bbdrop.train.loop import build_optimizer, train_stage

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def cdf(t: float, log_alpha: float) -> float:
    """P(z <= t) from the concrete's CDF, P(s <= x) = sigmoid(beta logit(x) - log alpha),
    at x = (t - gamma) / (zeta - gamma): the inverse of the stretch."""
    x = (t - GAMMA) / (ZETA - GAMMA)
    return sigmoid(BETA * math.log(x / (1 - x)) - log_alpha)


def p_nonzero(log_alpha: float) -> float:
    return 1.0 - cdf(0.0, log_alpha)


def p_one(log_alpha: float) -> float:
    """P(z = 1) = P(stretched s >= 1) = 1 - P(s <= (1 - gamma)/(zeta - gamma))."""
    x = (1 - GAMMA) / (ZETA - GAMMA)
    return 1.0 - sigmoid(BETA * math.log(x / (1 - x)) - log_alpha)


def test_reference_defaults_and_initialisation() -> None:
    torch.manual_seed(0)
    n = 20000
    gate = HardConcreteGate(n)
    settings = (gate.droprate_init, gate.temperature, gate.gamma, gate.zeta)
    assert settings == (0.5, BETA, GAMMA, ZETA)
    # the authors' lambda = 0.1/60000 and weight decay 1e-4 in whole-dataset units (N = 60000)
    assert gate.lamb == pytest.approx(0.1 / 60000 * 60000)
    assert gate.weight_decay == pytest.approx(1e-4 * 60000)
    assert gate.kl_scale == 1.0
    # log_alpha ~ N(log((1 - p) / p), 0.01^2): mean within 5 standard errors, std within
    # 5 standard errors of the sample std (0.01 / sqrt(2n) relative)
    for p in (0.5, 0.2):
        la = HardConcreteGate(n, droprate_init=p).log_alpha.detach().double()
        assert abs(la.mean().item() - math.log((1 - p) / p)) < 5 * 0.01 / math.sqrt(n)
        assert abs(la.std().item() / 0.01 - 1) < 5 / math.sqrt(2 * n)
    # p = 0.5: every gate starts near the test-time value 1.2 * 1/2 - 0.1 = 0.5, whose slope
    # in log_alpha is 1.2 / 4 = 0.3: 5 standard deviations are 0.015
    torch.testing.assert_close(gate.gate_values(), torch.full((n,), 0.5), atol=0.015, rtol=0)


def test_closed_forms_give_the_reference_values() -> None:
    """baselines.md section 4, checks 1-2, and the CDF computed another way."""
    la = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
    nonzero = hard_concrete_prob_nonzero(la, BETA, GAMMA, ZETA)
    one = hard_concrete_prob_one(la, BETA, GAMMA, ZETA)
    torch.testing.assert_close(
        nonzero,
        torch.tensor([0.197594, 0.831822, 0.990034], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(
        one[1:], torch.tensor([0.168178, 0.802406], dtype=torch.float64), atol=1e-6, rtol=0
    )
    for k, v in enumerate(la.tolist()):
        assert nonzero[k].item() == pytest.approx(p_nonzero(v), abs=1e-12)
        assert one[k].item() == pytest.approx(p_one(v), abs=1e-12)
        for t in (0.0, 0.3, 0.9):
            got = hard_concrete_cdf(t, la[k], BETA, GAMMA, ZETA).item()
            assert got == pytest.approx(cdf(t, v), abs=1e-12)
    with pytest.raises(ValueError, match="t must be"):
        hard_concrete_cdf(1.0, la, BETA, GAMMA, ZETA)


@pytest.mark.slow
def test_sampler_matches_the_closed_forms_by_monte_carlo() -> None:
    """2e6 float32 samples per log alpha. A frequency p estimated from n samples has
    standard error sqrt(p (1 - p) / n) <= 3.5e-4; we allow 5 standard errors."""
    torch.manual_seed(0)
    n = 2_000_000
    log_alphas = [-3.0, 0.0, 1.5, 3.0]
    z = hard_concrete_rsample(torch.tensor(log_alphas), BETA, GAMMA, ZETA, (n,))  # (n, 4)
    assert z.dtype == torch.float32 and z.min() >= 0 and z.max() <= 1
    for k, la in enumerate(log_alphas):
        zk = z[:, k]
        checks = [((zk != 0), p_nonzero(la)), ((zk == 1), p_one(la))]
        checks += [((zk <= t), cdf(t, la)) for t in (0.25, 0.5, 0.75)]
        for hits, p in checks:
            se = math.sqrt(p * (1 - p) / n)
            assert abs(hits.double().mean().item() - p) < 5 * se + 1e-7, (la, p)


def expected_z(log_alpha: float) -> float:
    """E[z] = integral over t in [0, 1] of P(z > t) = 1 - CDF(t), with the closed-form CDF
    (the same inverse-stretch form as ``cdf``), by the trapezoid rule in numpy, float64.
    The integrand is smooth on [0, 1]; 1e5 intervals give ~1e-10."""
    t = np.linspace(0.0, 1.0, 100_001)
    x = (t - GAMMA) / (ZETA - GAMMA)
    survival = 1.0 - 1.0 / (1.0 + np.exp(-(BETA * np.log(x / (1 - x)) - log_alpha)))
    return float(((survival[1:] + survival[:-1]) / 2 * np.diff(t)).sum())


def test_mean_of_samples_matches_quadrature() -> None:
    torch.manual_seed(1)
    n = 1_000_000
    log_alphas = [-1.0, 0.5, 2.0]
    z = hard_concrete_rsample(
        torch.tensor(log_alphas, dtype=torch.float64), BETA, GAMMA, ZETA, (n,)
    )
    for k, la in enumerate(log_alphas):
        se = z[:, k].std().item() / math.sqrt(n)
        assert abs(z[:, k].mean().item() - expected_z(la)) < 5 * se


def set_log_alpha(gate: HardConcreteGate, values: list[float]) -> None:
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(values, dtype=gate.log_alpha.dtype))


def test_training_mask_is_one_draw_per_unit_shared_by_the_minibatch() -> None:
    gate = HardConcreteGate(7).train()
    torch.manual_seed(3)
    y = gate(torch.ones(5, 7))
    torch.manual_seed(3)
    z = hard_concrete_rsample(gate.log_alpha, BETA, GAMMA, ZETA)
    torch.testing.assert_close(y, z.expand(5, 7), rtol=0, atol=0)
    assert gate.mask(torch.ones(5, 7)).shape == (7,)
    yc = gate(torch.ones(3, 7, 2, 2))
    torch.testing.assert_close(yc, yc[:1, :, :1, :1].expand_as(yc), rtol=0, atol=0)


def test_test_value_zeroes_pruned_units_and_units_are_counted_not_summed() -> None:
    la = [-40.0, -2.4, math.log(1 / 11) - 1e-4, -2.39, 0.0, 2.0, math.log(11) + 1e-4, 40.0]
    expected = [min(1.0, max(0.0, sigmoid(v) * (ZETA - GAMMA) + GAMMA)) for v in la]
    assert expected[:3] == [0.0, 0.0, 0.0] and 0 < expected[3] < 1e-3 and expected[6:] == [1, 1]
    values = hard_concrete_test_value(torch.tensor(la), GAMMA, ZETA)
    torch.testing.assert_close(values, torch.tensor(expected), atol=1e-6, rtol=0)
    assert values[:3].eq(0).all() and values[4].item() == pytest.approx(0.5, abs=1e-7)
    gate = HardConcreteGate(8).eval()
    set_log_alpha(gate, la)
    x = torch.randn(4, 8)
    torch.testing.assert_close(gate(x), x * values, rtol=0, atol=0)
    assert gate(x)[:, :3].eq(0).all()
    assert gate.keep_mask().tolist() == [False] * 3 + [True] * 5
    # 5 units kept although the values sum to about 3.5 (the authors printed the sum)
    assert gate.num_kept() == 5 and int(gate.gate_values().sum()) == 3
    gate.prune_(torch.tensor([True] * 7 + [False]))
    assert gate.gate_values()[7].item() == 0.0 and gate.num_kept() == 4
    net = bbdrop.gate_layer_(nn.Linear(8, 2), gate, "input")
    assert bbdrop.units_kept(nn.Sequential(net)) == {"0": 4}


@pytest.mark.slow
def test_mc_sampling_draws_from_the_hard_concrete_and_keeps_pruned_units_off() -> None:
    torch.manual_seed(2)
    gate = HardConcreteGate(3).eval()
    set_log_alpha(gate, [-3.0, 0.5, 2.0])
    gate.mc_sampling = True
    draws = torch.stack([gate(torch.ones(1, 3))[0] for _ in range(4000)])  # (4000, 3)
    assert draws[:, 0].eq(0).all()  # test-time value 0: removed in MC mode too
    assert not torch.equal(draws[0], draws[1])
    for k, la in ((1, 0.5), (2, 2.0)):
        se = draws[:, k].std().item() / math.sqrt(len(draws))
        assert abs(draws[:, k].mean().item() - expected_z(la)) < 5 * se


def dense_by_hand(gate: HardConcreteGate, layer: nn.Linear) -> float:
    """sum_k P_k sum_j (lamb + wd/2 W[j, k]^2) + wd/2 sum b^2, with explicit loops."""
    w, b, la = layer.weight.tolist(), layer.bias.tolist(), gate.log_alpha.tolist()
    total = 0.0
    for k in range(layer.in_features):
        group = sum(gate.lamb + 0.5 * gate.weight_decay * w[j][k] ** 2 for j in range(len(w)))
        total += p_nonzero(la[k]) * group
    return total + sum(0.5 * gate.weight_decay * v**2 for v in b)


def test_dense_penalty_equals_a_hand_computation() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.25, 0.0, -3.0]]))
        layer.bias.copy_(torch.tensor([1.0, -2.0]))
    gate = HardConcreteGate(3, lamb=0.3, weight_decay=2.0, kl_scale=0.5).double()
    set_log_alpha(gate, [-1.0, 0.5, 2.0])
    # by hand: P = 0.34855, 0.89143, 0.98357 (cdf form); groups 0.3*2 + 1*(w^2 summed)
    p = [p_nonzero(v) for v in (-1.0, 0.5, 2.0)]
    hand = p[0] * (0.6 + 0.3125) + p[1] * (0.6 + 1.0) + p[2] * (0.6 + 13.0) + 1.0 * 5.0
    assert dense_by_hand(gate, layer) == pytest.approx(hand, rel=1e-12)
    net = bbdrop.gate_layer_(layer, gate, "input")
    assert gate.regularizer(layer).item() == pytest.approx(hand, rel=1e-12)
    assert bbdrop.total_kl(net).item() == pytest.approx(0.5 * hand, rel=1e-12)
    layer.bias = None
    assert gate.regularizer(layer).item() == pytest.approx(hand - 5.0, rel=1e-12)


def test_conv_penalty_gates_the_filter_and_its_bias() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2).double()
    gate = HardConcreteGate(3, lamb=0.2, weight_decay=1.5).double()
    set_log_alpha(gate, [-2.0, 0.0, 1.0])
    bbdrop.gate_layer_(conv, gate, "output")
    w, b, la = conv.weight.tolist(), conv.bias.tolist(), gate.log_alpha.tolist()
    hand = 0.0
    for k in range(3):
        group = sum(
            0.2 + 0.75 * w[k][c][i][j] ** 2 for c in range(2) for i in range(2) for j in range(2)
        )
        hand += p_nonzero(la[k]) * (
            group + 0.2 + 0.75 * b[k] ** 2
        )  # +lamb (L0code's -lamb: a typo)
    assert gate.regularizer(conv).item() == pytest.approx(hand, rel=1e-12)
    conv.bias = None
    hand_nb = sum(
        p_nonzero(la[k]) * sum(0.2 + 0.75 * v**2 for v in torch.tensor(w[k]).flatten().tolist())
        for k in range(3)
    )
    assert gate.regularizer(conv).item() == pytest.approx(hand_nb, rel=1e-12)


def test_defaults_reproduce_the_authors_lenet_mlp_objective() -> None:
    """BBcode lenet_mlp_mnist_l0reg.py: CE + 1.0 * reg with lamb = 0.1/60000 and weight
    decay 1e-4 per example; bbdrop adds kl_scale * regularizer / N with N = 60000."""
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), "l0")
    authors = 0.0
    for gated in (net[0], net[2]):
        q0 = torch.sigmoid(math.log(1 / 11) * BETA - gated.gate.log_alpha).clamp(1e-6, 1 - 1e-6)
        w, b = gated.weight.t(), gated.bias  # BBcode l0reg.py:56-60
        col = (0.5 * 1e-4 * w.pow(2) + 0.1 / 60000).sum(1)
        authors = authors + ((1 - q0) * col).sum() + (0.5 * 1e-4 * b.pow(2)).sum()
    ours = bbdrop.total_kl(net) / 60000
    torch.testing.assert_close(ours, authors, rtol=1e-5, atol=0)


def test_penalty_is_the_expectation_over_sampled_gates() -> None:
    """baselines.md section 4, check 3: the mean over sampled gates of
    sum_k 1[z_k != 0] * cost_k + bias term; 5 standard errors of the mean."""
    torch.manual_seed(4)
    layer = nn.Linear(5, 4)
    gate = HardConcreteGate(5, lamb=0.5, weight_decay=3.0)
    bbdrop.gate_layer_(layer, gate, "input")
    set_log_alpha(gate, [-3.0, -1.0, 0.0, 1.0, 3.0])
    with torch.no_grad():
        cost = (0.5 + 1.5 * layer.weight.double().square()).sum(0)  # (5,)
        bias_cost = 1.5 * layer.bias.double().square().sum()
        z = hard_concrete_rsample(gate.log_alpha.detach().double(), BETA, GAMMA, ZETA, (400_000,))
        per_draw = (z != 0).double() @ cost + bias_cost
    se = per_draw.std().item() / math.sqrt(len(per_draw))
    assert abs(per_draw.mean().item() - gate.regularizer(layer).item()) < 5 * se


def test_penalty_gradients_match_finite_differences() -> None:
    torch.manual_seed(0)
    la = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for w_shape, unit_dim, b_len in (((3, 4), 1, 3), ((4, 2, 3, 3), 0, 4)):
        w = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
        b = torch.randn(b_len, dtype=torch.float64, requires_grad=True)

        def penalty(la: torch.Tensor, w: torch.Tensor, b: torch.Tensor, unit_dim=unit_dim):
            p = hard_concrete_prob_nonzero(la, BETA, GAMMA, ZETA)
            return l0_penalty(p, w, b, unit_dim, 0.3, 2.0)

        assert torch.autograd.gradcheck(penalty, (la, w, b))


def test_penalty_of_a_weightless_layer_and_the_reference_clamp() -> None:
    gate = HardConcreteGate(4, lamb=0.5).double()
    set_log_alpha(gate, [-40.0, -1.0, 1.0, 40.0])
    p = [p_nonzero(v) for v in (-40.0, -1.0, 1.0, 40.0)]
    # P(z != 0) clamped to [1e-6, 1 - 1e-6] in the penalty, as both references do
    clamped = [1e-6, p[1], p[2], 1 - 1e-6]
    assert gate.prob_nonzero().tolist() == pytest.approx(clamped, rel=1e-12, abs=0)
    reg = gate.regularizer(nn.Identity())
    assert reg.dtype == torch.float64
    assert reg.item() == pytest.approx(0.5 * sum(clamped), rel=1e-12)
    exact = hard_concrete_prob_nonzero(gate.log_alpha, BETA, GAMMA, ZETA)
    assert 0 < exact[0].item() < 1e-15  # the closed form itself is not clamped


def test_penalty_refuses_a_layer_of_another_width() -> None:
    """The units are on the side the gate is bound to; a gate on no layer cannot tell."""
    gate = HardConcreteGate(6)
    with pytest.raises(ValueError, match="on no layer"):
        gate.regularizer(nn.Linear(6, 3))
    bbdrop.gate_layer_(nn.Linear(6, 3), gate, "input")
    with pytest.raises(ValueError, match="6 units on the input"):
        gate.regularizer(nn.Linear(5, 3))
    bbdrop.gate_layer_(nn.Conv2d(1, 6, 3), gate, "output")
    with pytest.raises(ValueError, match="6 units on the output"):
        gate.regularizer(nn.Conv2d(1, 5, 3))


EXTREMES = [-1e4, -60.0, 60.0, 1e4, -torch.finfo(torch.float32).max, torch.finfo(torch.float32).max]


@pytest.mark.parametrize("la", EXTREMES)
def test_finite_in_float32_at_extreme_log_alpha(la: float) -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)), "l0"
    )
    gates = [net[0].gate, net[3].gate]
    for g in gates:
        g.log_alpha.data.fill_(la)
    x = torch.randn(2, 1, 4, 4) * 1e3
    loss = net.train()(x).square().mean() + bbdrop.total_kl(net)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in net.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    for g in gates:
        z, value = g.sample(), g.gate_values()
        assert torch.isfinite(z).all() and torch.isfinite(g.prob_nonzero()).all()
        assert torch.equal(z, torch.full_like(z, float(la > 0)))  # saturated draws
        assert torch.equal(value, torch.full_like(value, float(la > 0)))
    assert torch.isfinite(net.eval()(x)).all()


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("droprate_init", 0.0),
        ("droprate_init", 1.0),
        ("temperature", 0.0),
        ("temperature", float("nan")),
        ("gamma", 0.0),
        ("gamma", 0.2),
        ("gamma", -math.inf),
        ("zeta", 1.0),
        ("zeta", math.nan),
        ("lamb", -0.1),
        ("weight_decay", -1.0),
        ("weight_decay", math.inf),
        ("kl_scale", -1.0),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(arg: str, value: float) -> None:
    with pytest.raises(ValueError, match=arg):
        bbdrop.create_gate("l0", 4, **{arg: value})


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


@pytest.mark.parametrize("batch", [1, 5])
def test_attach_train_eval_and_state_dict_round_trip(batch: int) -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(small_net(), "l0")
    assert [type(g.gate) for _, g in bbdrop.gated_layers(net)] == [HardConcreteGate] * 3
    assert bbdrop.units_kept(net) == {"0": 4, "3": 64, "5": 8}
    x = torch.randn(batch, 1, 6, 6)
    out = net.train()(x)
    (out.square().mean() + bbdrop.total_kl(net) / 100).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert net[0].gate.log_alpha.grad.abs().sum() > 0
    with torch.no_grad():
        for _, g in bbdrop.gated_layers(net):
            g.gate.log_alpha.add_(3 * torch.randn_like(g.gate.log_alpha))
    copy = bbdrop.attach_gates_(small_net(), "l0")
    copy.load_state_dict(net.state_dict())
    net.eval(), copy.eval()
    torch.testing.assert_close(copy(x), net(x), rtol=0, atol=0)
    torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
    assert bbdrop.units_kept(copy) == bbdrop.units_kept(net)


def test_training_survives_zero_huge_and_single_example_batches() -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(small_net(), "l0")
    opt, _ = build_optimizer(net, OptimConfig(weight_decay=0.0), epochs=1)
    batches = [torch.zeros(4, 1, 6, 6), 1e4 * torch.randn(4, 1, 6, 6), torch.randn(1, 1, 6, 6)]
    for x in batches * 2:
        y = torch.randint(0, 3, (x.shape[0],))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net.train()(x), y) + bbdrop.total_kl(net) / 1000
        loss.backward()
        assert torch.isfinite(loss)
        opt.step()
        assert all(torch.isfinite(p).all() for p in net.parameters())
    assert torch.isfinite(net.eval()(batches[1])).all()


@pytest.mark.slow
def test_training_prunes_pure_noise_features_and_keeps_accuracy() -> None:
    """Three Gaussian blobs in 4 dimensions plus 12 pure-noise features: 240 steps of
    train_stage remove noise inputs of the first layer, keep the informative ones."""
    torch.manual_seed(0)
    means = 3.0 * torch.randn(3, 4)

    def blobs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        return torch.cat([means[y] + torch.randn(n, 4), torch.randn(n, 12)], 1), y

    (xtr, ytr), (xte, yte) = blobs(600), blobs(300)
    data = Dataset.from_tensors(xtr, ytr, xte, yte, 3)
    net = bbdrop.attach_gates_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)), "l0")
    gen = torch.Generator().manual_seed(0)
    history = train_stage(
        net,
        data.train_batches(50, gen),
        stage="l0",
        epochs=20,
        num_train=600,
        optim=OptimConfig(lr=1e-2, gate_lr=5e-2, weight_decay=0.0),
        evaluate_on=(xte, yte),
        generator=gen,
        flush_denormals=False,
    )
    keep = net[0].gate.keep_mask()
    assert keep[:4].all()
    assert (~keep[4:]).sum() >= 10
    assert history[0].units["0"] == 16 and history[-1].units["0"] == int(keep.sum())
    assert history[-1].error < 5.0
