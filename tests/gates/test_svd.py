"""Sparse variational dropout: the KL approximation against the exact KL, the local
reparameterisation against weight sampling, test-time pruning, unit counts, clamps,
training (docs/baselines/svd.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bbdrop
import bbdrop.gates.svd  # registers "svd"
from bbdrop.config import OptimConfig
from bbdrop.data import Dataset
from bbdrop.gates.svd import SparseVDGate, log_alpha, sparse_vd_kl
from bbdrop.train.loop import build_optimizer, train_stage

EULER_GAMMA = 0.5772156649015329
K1, K2, K3 = 0.63576, 1.87320, 1.48695  # SVDcode nets/layers.py:94


def gated(layer: nn.Module, **kwargs: object) -> nn.Module:
    return bbdrop.attach_gates_(layer, "svd", **kwargs)  # type: ignore[return-value]


def set_log_alpha(g: nn.Module, target: torch.Tensor) -> None:
    """log sigma^2 such that log alpha = ``target`` (computed in float64)."""
    w = g.weight.detach().double()
    with torch.no_grad():
        g.gate.log_sigma2.copy_(target.double() + torch.log(w.square() + 1e-8))


# -- the KL approximation ---------------------------------------------------------
def neg_kl_exact(la: float, points: int = 20001) -> float:
    """-KL(N(1, alpha) || log-uniform) = 0.5 log alpha - E log|eps| - C, eps ~ N(1, alpha),
    C = (gamma_E + log 2) / 2 (docs/baselines/svd.md), by the trapezoid rule in
    s = log|eps| over both half-lines, where the integrand is smooth (no log
    singularity at 0) and decays like e^s as s -> -inf."""
    sd = math.sqrt(math.exp(la))
    s = torch.linspace(-60.0, math.log(13.0 + 12.0 * sd), points, dtype=torch.float64)
    e = s.exp()
    dens = (torch.exp(-0.5 * ((e - 1) / sd) ** 2) + torch.exp(-0.5 * ((e + 1) / sd) ** 2)) / (
        sd * math.sqrt(2 * math.pi)
    )
    mass = torch.trapezoid(dens * e, s).item()
    assert abs(mass - 1.0) < 1e-9  # the grid holds the whole density
    e_log = torch.trapezoid(s * dens * e, s).item()
    return 0.5 * la - e_log - (EULER_GAMMA + math.log(2.0)) / 2


def neg_kl_reference_form(la: torch.Tensor) -> torch.Tensor:
    """SVDcode's expression as written (nets/layers.py:96)."""
    return K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * torch.log1p(torch.exp(-la)) - K1


def test_kl_formula_is_the_reference_expression_and_positive() -> None:
    la = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    kl = sparse_vd_kl(la)
    torch.testing.assert_close(kl, -neg_kl_reference_form(la), rtol=0, atol=1e-14)
    assert (kl > 0).all() and (kl.diff() < 0).all()  # decreasing in alpha: prunes
    kl32 = sparse_vd_kl(la.float())  # the stable form: float32 within 1e-6 of float64
    torch.testing.assert_close(kl32.double(), kl, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("la", "exact", "approx"),
    [(-4.0, -2.62575, -2.63421), (0.0, -0.42669, -0.43124), (3.0, -0.02469, -0.02542)],
)
def test_exact_kl_quadrature_and_approximation_match_the_reference_points(
    la: float, exact: float, approx: float
) -> None:
    """docs/baselines/svd.md's reference values (5 decimals)."""
    assert neg_kl_exact(la) == pytest.approx(exact, abs=6e-6)
    assert -sparse_vd_kl(torch.tensor(la, dtype=torch.float64)).item() == pytest.approx(
        approx, abs=6e-6
    )


@pytest.mark.slow
def test_kl_approximation_is_within_0_01_of_the_exact_kl() -> None:
    """Max |approx - exact| over log alpha in [-10, 10] is 0.0094 at about -3.5."""
    grid = torch.linspace(-10, 10, 201, dtype=torch.float64)
    approx = -sparse_vd_kl(grid)
    exact = torch.tensor([neg_kl_exact(v) for v in grid.tolist()], dtype=torch.float64)
    err = (approx - exact).abs()
    assert err.max().item() < 0.01
    assert err.max().item() > 0.009  # the fit is that loose, not tighter: the grid is right
    assert grid[err.argmax()].item() == pytest.approx(-3.5, abs=0.2)


@pytest.mark.parametrize("la", [-4.0, 0.0, 3.0])
def test_quadrature_agrees_with_monte_carlo(la: float) -> None:
    """E log|eps| by 10^6 seeded draws; the band is 5 standard errors."""
    gen = torch.Generator().manual_seed(0)
    eps = 1 + math.exp(la / 2) * torch.randn(10**6, generator=gen, dtype=torch.float64)
    logs = eps.abs().log()
    mc = 0.5 * la - logs.mean().item() - (EULER_GAMMA + math.log(2.0)) / 2
    se = logs.std().item() / 1000
    assert abs(mc - neg_kl_exact(la)) < 5 * se


def test_kl_gradient_matches_finite_differences() -> None:
    w = torch.tensor([0.3, -0.05, 1.2, 0.01], dtype=torch.float64, requires_grad=True)
    ls2 = torch.tensor([-3.0, -5.0, 1.0, -9.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sparse_vd_kl(log_alpha(a, b)).sum(), (w, ls2))


def test_log_alpha_is_clipped_like_the_reference() -> None:
    w = torch.tensor([1.0, 1.0, 1.0, 0.0])
    ls2 = torch.tensor([-20.0, 20.0, 2.0, 0.0])
    assert log_alpha(w, ls2).tolist() == [-8.0, 8.0, 2.0, 8.0]  # log(0 + 1e-8) = -18.4


def test_regularizer_sums_the_kl_and_total_kl_scales_it() -> None:
    torch.manual_seed(0)
    g = gated(nn.Linear(5, 4), kl_scale=0.5)
    la = torch.linspace(-6, 6, 20).reshape(4, 5).double()
    set_log_alpha(g, la)
    want = -neg_kl_reference_form(la).sum().item()
    assert g.gate.regularizer(g).item() == pytest.approx(want, rel=1e-5)
    assert bbdrop.total_kl(g).item() == pytest.approx(0.5 * want, rel=1e-5)


# -- local reparameterisation ---------------------------------------------------
def moments_agree(
    direct: torch.Tensor, lrt: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> None:
    """Over the S draws in dimension 0: sample means within 5 standard errors
    (sqrt(var / S)) of the closed form and of each other, sample variances within
    5 standard errors (var sqrt(2 / S) for a Gaussian) of the closed form."""
    n = direct.shape[0]
    for sample in (direct, lrt):
        assert ((sample.mean(0) - mean).abs() <= 5 * (var / n).sqrt()).all()
        assert ((sample.var(0) - var).abs() <= 5 * var * math.sqrt(2 / n)).all()
    assert ((direct.mean(0) - lrt.mean(0)).abs() <= 5 * (2 * var / n).sqrt()).all()


def test_dense_lrt_matches_direct_weight_sampling() -> None:
    """w ~ N(theta, alpha theta^2) per weight and draw against the layer's training pass
    (20000 draws); one weight is pruned (log alpha > 3), so it is exactly 0 in both
    (train_clip)."""
    torch.manual_seed(0)
    g = gated(nn.Linear(5, 3)).double().train()
    la = torch.empty(3, 5, dtype=torch.float64).uniform_(-4, 1)
    la[1, 2] = 5.0
    set_log_alpha(g, la)
    theta = g.weight.detach() * (la < 3)
    bias = g.bias.detach()
    sigma2 = la.exp() * theta.square()
    x = torch.randn(4, 5, dtype=torch.float64)
    n = 20000
    w = theta + sigma2.sqrt() * torch.randn(n, 3, 5, dtype=torch.float64)
    direct = torch.einsum("bi,sji->sbj", x, w) + bias
    with torch.no_grad():
        lrt = g(x.repeat(n, 1)).view(n, 4, 3)
    mean = x @ theta.T + bias
    var = x.square() @ sigma2.T + 1e-8
    moments_agree(direct, lrt, mean, var)


@pytest.mark.parametrize(("stride", "padding", "groups"), [(1, 0, 1), (2, 1, 2)])
def test_conv_lrt_matches_direct_weight_sampling(stride: int, padding: int, groups: int) -> None:
    """As for dense layers, per output position, with 4000 draws."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 3, stride=stride, padding=padding, groups=groups)
    g = gated(conv).double().train()
    la = torch.empty(conv.weight.shape, dtype=torch.float64).uniform_(-4, 1)
    set_log_alpha(g, la)
    theta, bias = conv.weight.detach(), conv.bias.detach()
    sigma2 = la.exp() * theta.square()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    n = 4000
    w = theta + sigma2.sqrt() * torch.randn(n, *theta.shape, dtype=torch.float64)

    def conv_with(weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride, padding, 1, groups)[0]

    direct = torch.vmap(conv_with)(w)  # (n, C, H, W)
    with torch.no_grad():
        lrt = g(x.expand(n, -1, -1, -1))
    mean = conv_with(theta)
    var = F.conv2d(x.square(), sigma2, None, stride, padding, 1, groups)[0] + 1e-8
    moments_agree(direct, lrt, mean, var)


def test_noise_is_per_example_and_pre_activation() -> None:
    torch.manual_seed(0)
    g = gated(nn.Linear(3, 4)).train()
    set_log_alpha(g, torch.zeros(4, 3))
    y = g(torch.ones(2, 3))
    assert not torch.equal(y[0], y[1])
    centred = y - (torch.ones(2, 3) @ g.weight.T + g.bias)
    assert (centred != 0).all()


def test_without_train_clip_pruned_weights_still_act_in_training() -> None:
    torch.manual_seed(0)
    g = gated(nn.Linear(2, 1), train_clip=False).double().train()
    set_log_alpha(g, torch.tensor([[5.0, 5.0]]))
    w = g.weight.detach()
    x = torch.ones(20000, 2, dtype=torch.float64)
    with torch.no_grad():
        y = g(x)
    var = (math.exp(5.0) * w.square()).sum().item()
    mean = (w.sum() + g.bias).item()
    assert abs(y.mean().item() - mean) < 5 * math.sqrt(var / 20000)
    g.gate.train_clip = True
    with torch.no_grad():
        y = g(x)
    torch.testing.assert_close(y, torch.full_like(y, g.bias.item()), rtol=0, atol=1e-3)


# -- test time, units -----------------------------------------------------------------
def test_eval_uses_the_pruned_weights_and_counts_units() -> None:
    torch.manual_seed(0)
    g = gated(nn.Linear(4, 3)).eval()
    la = torch.tensor(
        [[5.0, -2.0, 4.0, 3.0], [6.0, 2.9, 8.0, 3.5], [7.0, 1.0, -8.0, 4.0]]
    )  # column 0 and 3 all >= 3: units 0 and 3 gone; column 2 keeps one weight
    set_log_alpha(g, la)
    w = g.weight.detach() * (la < 3)
    x = torch.randn(6, 4)
    torch.testing.assert_close(g(x), x @ w.T + g.bias, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g(x), g(x), rtol=0, atol=0)  # deterministic
    assert g.gate.gate_values().tolist() == [0.0, 1.0, 1.0, 0.0]
    assert g.gate.keep_mask().tolist() == [False, True, True, False]
    assert bbdrop.units_kept(nn.Sequential(g)) == {"0": 2}
    x2 = x.clone()
    x2[:, [0, 3]] = torch.randn(6, 2) * 100
    assert torch.equal(g(x2), g(x))  # gone inputs have no influence
    g.gate.prune_(torch.tensor([True, False, True, True]))
    assert g.gate.gate_values().tolist() == [0.0, 0.0, 1.0, 0.0]
    assert bbdrop.units_kept(nn.Sequential(g)) == {"0": 1}
    x2[:, 1] = 7.0
    assert torch.equal(g(x2), g(x))


def test_threshold_is_inclusive_like_the_reference() -> None:
    """log alpha >= 3 prunes (T.ge): with theta = 1, log(1 + 1e-8) is 0 in float32."""
    g = gated(nn.Linear(2, 1))
    with torch.no_grad():
        g.weight.fill_(1.0)
        g.gate.log_sigma2.copy_(torch.tensor([[3.0, 2.999]]))
    la = log_alpha(g.weight, g.gate.log_sigma2)
    assert torch.equal(la, torch.tensor([[3.0, 2.999]]))
    assert g.gate.gate_values().tolist() == [0.0, 1.0]


def test_conv_gone_filter_outputs_exact_zero() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    g = gated(conv).eval()
    la = torch.full(conv.weight.shape, -2.0)
    la[1] = 4.0  # filter 1 entirely pruned
    la[2, 0] = 4.0  # filter 2 keeps its second input channel
    set_log_alpha(g, la)
    x = torch.randn(5, 2, 6, 6)
    y = g(x)
    assert torch.equal(y[:, 1], torch.zeros(5, 6, 6))  # its bias is gone too
    want = F.conv2d(x, conv.weight.detach() * (la < 3), conv.bias.detach(), padding=1)
    torch.testing.assert_close(y[:, [0, 2]], want[:, [0, 2]], rtol=1e-5, atol=1e-5)
    assert g.gate.gate_values().tolist() == [1.0, 0.0, 1.0]
    assert bbdrop.units_kept(nn.Sequential(g)) == {"0": 2}
    # training with train_clip gives the gone filter no output either
    g.train()
    assert torch.equal(g(x)[:, 1], torch.zeros(5, 6, 6))


def test_mc_sampling_and_mask_hooks() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    bbdrop.attach_gates_(net, "svd")
    set_log_alpha(net[0], torch.tensor([[4.0, 0.0, 0.0]] * 4))
    net.eval()
    x = torch.randn(7, 3)
    masks = bbdrop.collect_masks(net, x)
    assert masks["0"].tolist() == [[0.0, 1.0, 1.0]] * 7
    with bbdrop.mc_sampling(net):
        a, b = net(x), net(x)
    assert not torch.equal(a, b)
    assert torch.equal(net(x), net(x))


# -- set-up and settings --------------------------------------------------------------
def test_reference_defaults_and_bind_creates_log_sigma2() -> None:
    gate = SparseVDGate(4)
    assert (gate.threshold, gate.init_log_sigma2, gate.train_clip, gate.kl_scale) == (
        3.0,
        -10.0,
        True,
        1.0,
    )
    assert list(gate.parameters()) == []
    layer = nn.Linear(4, 3).double()
    g = bbdrop.gate_layer_(layer, gate, "input")
    assert g.gate.log_sigma2.shape == (3, 4) and g.gate.log_sigma2.dtype == torch.float64
    assert torch.equal(g.gate.log_sigma2, torch.full((3, 4), -10.0, dtype=torch.float64))
    conv = gated(nn.Conv2d(2, 5, 3))
    assert conv.gate.log_sigma2.shape == (5, 2, 3, 3) and conv.gate.num_units == 5


def test_log_sigma2_is_in_the_gate_group() -> None:
    net = bbdrop.attach_gates_(nn.Sequential(nn.Linear(3, 2)), "svd")
    opt, _ = build_optimizer(net, OptimConfig(gate_lr=1e-3, weight_decay=1e-4), epochs=2)
    _, gates = opt.param_groups
    assert [p is net[0].gate.log_sigma2 for p in gates["params"]] == [True]
    assert (gates["lr"], gates["weight_decay"]) == (1e-3, 0.0)


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("threshold", 8.5),
        ("threshold", -8.0),
        ("threshold", float("nan")),
        ("init_log_sigma2", float("inf")),
        ("init_log_sigma2", True),
        ("train_clip", 1),
        ("kl_scale", -1.0),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(arg: str, value: object) -> None:
    with pytest.raises(ValueError, match=arg):
        SparseVDGate(4, **{arg: value})


def test_bad_layers_and_unbound_use_are_refused() -> None:
    with pytest.raises(TypeError, match=r"nn\.Linear or nn\.Conv1d/2d/3d"):
        bbdrop.gate_layer_(nn.Identity(), SparseVDGate(4), "input")
    with pytest.raises(ValueError, match="4 units but the layer has 5"):
        bbdrop.gate_layer_(nn.Linear(5, 2), SparseVDGate(4), "input")
    with pytest.raises(ValueError, match="padding_mode"):
        bbdrop.gate_layer_(nn.Conv2d(1, 4, 3, padding_mode="reflect"), SparseVDGate(4), "output")
    with pytest.raises(ValueError, match="on no layer"):
        SparseVDGate(4).gate_values()
    g = gated(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="shape"):
        g.gate.regularizer(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="float64"):
        g(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 units"):
        g.eval()(torch.randn(2, 5))


def test_state_dict_round_trip() -> None:
    def make() -> nn.Module:
        return bbdrop.attach_gates_(
            nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(12, 2)), "svd"
        )

    torch.manual_seed(0)
    src = make()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 3)
    dst = make()
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 1, 4, 4)
    assert torch.equal(dst.eval()(x), src.eval()(x))
    assert bbdrop.units_kept(dst) == bbdrop.units_kept(src)


# -- finiteness and training ----------------------------------------------------------
@pytest.mark.parametrize("ls2", [-1e4, 1e4])
@pytest.mark.parametrize("w", [0.0, 1e-30, 1e4])
@pytest.mark.parametrize("scale", [0.0, 1e4])
@pytest.mark.parametrize("n", [1, 16])
def test_finite_at_the_clamps_in_float32(ls2: float, w: float, scale: float, n: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    bbdrop.attach_gates_(net, "svd")
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.fill_(ls2 if name.endswith("log_sigma2") else w)
    x = torch.randn(n, 2, 4, 4) * scale
    for training in (True, False):
        net.train(training)
        y = net(x)
        loss = y.square().mean() + bbdrop.total_kl(net)
        loss.backward()
        assert torch.isfinite(y).all() and torch.isfinite(loss)
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", ["zeros", "huge", "single"])
def test_adam_steps_on_odd_batches_stay_finite(kind: str) -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), "svd")
    opt, _ = build_optimizer(net, OptimConfig(), epochs=1)
    x = {"zeros": torch.zeros(8, 6), "huge": 1e4 * torch.randn(8, 6), "single": torch.randn(1, 6)}
    y = torch.randint(0, 3, (x[kind].shape[0],))
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(net(x[kind]), y) + bbdrop.total_kl(net) / 100
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """3 Gaussian classes on 4 features, then 12 features of pure noise."""
    y = torch.randint(0, 3, (n,), generator=gen)
    centres = torch.tensor([[2.5, 0, 0, 0], [0, 2.5, 0, 0], [0, 0, 2.5, 2.5]])
    noise = torch.randn(n, 12, generator=gen)
    return torch.cat([centres[y] + torch.randn(n, 4, generator=gen), noise], dim=1), y


@pytest.mark.slow
def test_training_prunes_the_noise_features_and_keeps_accuracy() -> None:
    """300 Adam steps (30 epochs of 10 batches) of train_stage."""
    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_tensors(*blobs(600, gen), *blobs(600, gen), num_classes=3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    bbdrop.attach_gates_(net, "svd")
    history = train_stage(
        net,
        data.train_batches(60, gen),
        stage="svd",
        epochs=30,
        num_train=600,
        optim=OptimConfig(lr=1e-2, gate_lr=1e-2, weight_decay=0.0, decay_gates=True),
        evaluate_on=(data.test_x, data.test_y),
        generator=gen,
    )
    keep = net[0].gate.keep_mask()
    assert keep[:4].all()  # the informative features stay
    assert int(keep[4:].sum()) <= 2  # the noise features go (all 12 in practice)
    assert history[-1].units["0"] == int(keep.sum())
    assert history[-1].error < 10.0  # the Bayes error of these blobs is about 4%
    assert history[-1].kl < history[0].kl
