"""SSL gate: group norms, gradient, proximal step, test-time mask, training end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bbdrop
import bbdrop.gates.ssl  # registers "ssl" (not yet imported by bbdrop.gates)
from bbdrop.config import OptimConfig
from bbdrop.data import Dataset
from bbdrop.gates.ssl import SSLGate, group_lasso, group_norms, group_shrink_factor, unit_groups
from bbdrop.train.loop import train_stage


def gated_linear(weight: list[list[float]], **kwargs: object) -> nn.Module:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
    return bbdrop.attach_gates_(layer, "ssl", **kwargs)  # type: ignore[return-value]


def loop_norms(weight: torch.Tensor, dim: int, bias: torch.Tensor | None = None) -> list[float]:
    """Group norms by an explicit loop over units and elements, in Python floats."""
    out = []
    for k in range(weight.shape[dim]):
        total = sum(v * v for v in weight.select(dim, k).flatten().tolist())
        if bias is not None:
            total += float(bias[k].detach()) ** 2
        out.append(math.sqrt(total))
    return out


# -- settings ------------------------------------------------------------------------
def test_reference_defaults_and_registry() -> None:
    gate = SSLGate(5)
    assert (gate.threshold, gate.proximal, gate.include_bias) == (1e-5, False, False)
    assert gate.kl_scale == pytest.approx(0.005 * 60000)  # lambda = 0.005 at N = 60000
    assert list(gate.parameters()) == []  # nothing learned beyond the layer's weights
    assert bbdrop.get_gate_class("ssl") is SSLGate


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("threshold", 0.0),
        ("threshold", 1.0),
        ("threshold", -1e-5),
        ("threshold", float("nan")),
        ("kl_scale", -1.0),
        ("kl_scale", float("inf")),
        ("proximal", 1),
        ("include_bias", "yes"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(arg: str, value: object) -> None:
    with pytest.raises(ValueError, match=arg):
        SSLGate(4, **{arg: value})  # type: ignore[arg-type]


def test_a_gate_on_no_layer_or_the_wrong_layer_says_so() -> None:
    gate = SSLGate(4)
    with pytest.raises(ValueError, match="attach_gates_"):
        gate.gate_values()
    with pytest.raises(ValueError, match="attach_gates_"):
        gate.regularizer(nn.Linear(4, 3))
    gate.bind(nn.Linear(4, 3), "input")
    with pytest.raises(ValueError, match=r"4 units.*\(3, 5\)"):
        gate.regularizer(nn.Linear(5, 3))
    with pytest.raises(ValueError, match="rank >= 2"):
        gate.regularizer(nn.Identity())


# -- the mathematics -----------------------------------------------------------------
def test_group_norms_against_a_hand_computation() -> None:
    # columns (3, 4, 0) -> 5, (0, 0, 0) -> 0, (1, 2, 2) -> 3, (1e-3, 0, 0) -> 1e-3
    net = gated_linear([[3.0, 0.0, 1.0, 1e-3], [4.0, 0.0, 2.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    expected = [5.0, 0.0, 3.0, 1e-3]
    torch.testing.assert_close(net.gate.group_norms(), torch.tensor(expected), rtol=1e-6, atol=0)
    reg = net.gate.regularizer(net)
    assert reg.shape == () and float(reg.detach()) == pytest.approx(8.001, rel=1e-6)
    # the objective's term: kl_scale * sum of the unweighted group norms
    assert float(bbdrop.total_kl(net).detach()) == pytest.approx(300 * 8.001, rel=1e-6)


@pytest.mark.parametrize("include_bias", [False, True])
def test_conv_groups_are_filters_and_dense_groups_are_columns(include_bias: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))
    bbdrop.attach_gates_(model, "ssl", include_bias=include_bias)
    conv, dense = model[0], model[3]
    bias = conv.bias if include_bias else None
    torch.testing.assert_close(
        conv.gate.group_norms().tolist(), loop_norms(conv.weight, 0, bias), rtol=1e-5, atol=0
    )
    # a dense input unit owns no bias: include_bias changes nothing there
    torch.testing.assert_close(
        dense.gate.group_norms().tolist(), loop_norms(dense.weight, 1), rtol=1e-5, atol=0
    )
    assert unit_groups(conv.weight, 0).shape == (5, 27)
    assert unit_groups(dense.weight, 1).shape == (80, 7)


def test_gradient_against_finite_differences_and_the_closed_form() -> None:
    torch.manual_seed(1)
    w = torch.randn(4, 6, dtype=torch.float64)
    w[:, 2] = 0.0  # a zero group: subgradient 0
    w.requires_grad_()
    (grad,) = torch.autograd.grad(group_lasso(unit_groups(w, 1)), w)
    fd = torch.zeros_like(w)
    h = 1e-6
    with torch.no_grad():
        for i in range(4):
            for j in range(6):
                if j == 2:
                    continue  # not differentiable there
                e = torch.zeros_like(w)
                e[i, j] = h
                up = group_lasso(unit_groups(w + e, 1))
                down = group_lasso(unit_groups(w - e, 1))
                fd[i, j] = (up - down) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-7, atol=1e-8)
    closed = w.detach() / w.detach().norm(dim=0, keepdim=True)  # w_k / ||w_k||
    closed[:, 2] = 0.0
    torch.testing.assert_close(grad, closed, rtol=1e-12, atol=1e-12)
    assert torch.equal(grad[:, 2], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-20, 1e-3, 1.0, 1e4, 1e15])
def test_norms_and_gradients_are_finite_in_float32(scale: float) -> None:
    torch.manual_seed(2)
    w = (torch.randn(8, 9) * scale).requires_grad_()
    norms = group_norms(unit_groups(w, 1))
    norms.sum().backward()
    assert torch.isfinite(norms).all() and torch.isfinite(w.grad).all()
    expect = w.detach().double().norm(dim=0).float()
    if scale >= 1e-3:
        torch.testing.assert_close(norms.detach(), expect, rtol=1e-5, atol=0)
    else:  # squares underflow in float32: the norm is 0 or under 1e-19, never NaN
        assert (norms <= 1e-19).all()


def test_shrink_factor_is_group_soft_thresholding() -> None:
    norms = torch.tensor([0.0, 0.05, 0.1, 0.2, 1.0])
    factor = group_shrink_factor(norms, 0.1)
    torch.testing.assert_close(factor, torch.tensor([0.0, 0.0, 0.0, 0.5, 0.9]), rtol=0, atol=1e-7)
    assert torch.equal(group_shrink_factor(torch.zeros(3), 0.0), torch.zeros(3))


def test_proximal_step_is_the_closed_form_and_solves_the_prox_problem() -> None:
    torch.manual_seed(3)
    lr, n = 0.01, 100
    layer = nn.Linear(5, 4).double()
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([1.0, 0.02, 1e-3, 0.0, 3.0], dtype=torch.float64))
    net = bbdrop.attach_gates_(layer, "ssl", kl_scale=50.0, proximal=True)
    t = lr * 50.0 / n  # lr * lambda, lambda = kl_scale / N
    before = layer.weight.detach().clone()
    net.gate.proximal_step(lr, n)
    after = layer.weight.detach()
    for k in range(5):
        norm = math.sqrt(sum(v * v for v in before[:, k].tolist()))
        if norm <= t:
            assert torch.equal(after[:, k], torch.zeros(4, dtype=torch.float64))
        else:
            torch.testing.assert_close(after[:, k], before[:, k] * (1 - t / norm))
    assert [float(after[:, k].norm()) == 0 for k in range(5)] == [False, False, True, True, False]

    # prox of t||.||: argmin_v 0.5 ||v - w||^2 + t ||v||, compared with random candidates
    def objective(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * (v - w).square().sum(0) + t * v.norm(dim=0)

    best = objective(after, before)
    for _ in range(200):
        candidate = after + 1e-3 * torch.randn_like(after)
        assert (objective(candidate, before) >= best - 1e-15).all()


def test_proximal_step_on_conv_filters_with_bias_and_no_op_without_proximal() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 2)
    with torch.no_grad():
        conv.weight[1].mul_(1e-4)
        conv.bias[1] = 1e-4
    net = bbdrop.attach_gates_(conv, "ssl", kl_scale=1.0, proximal=True, include_bias=True)
    norms = loop_norms(conv.weight.detach(), 0, conv.bias.detach())
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    net.gate.proximal_step(0.1, 100)  # t = 1e-3: filter 1 (norm < 1e-3) goes
    t = 1e-3
    for k in range(3):
        factor = max(0.0, 1 - t / norms[k])
        torch.testing.assert_close(conv.weight[k].detach(), w0[k] * factor)
        torch.testing.assert_close(conv.bias[k].detach(), b0[k] * factor)
    assert float((conv.weight[1].abs().sum() + conv.bias[1].abs()).detach()) == 0.0
    assert net.gate.keep_mask().tolist() == [True, False, True]
    plain = bbdrop.attach_gates_(nn.Linear(3, 2), "ssl")
    w = plain.weight.detach().clone()
    plain.gate.proximal_step(1.0, 1)
    assert torch.equal(plain.weight, w)
    with pytest.raises(ValueError, match="lr"):
        plain.gate.proximal_step(0.0, 1)
    with pytest.raises(ValueError, match="num_train"):
        plain.gate.proximal_step(0.1, 0)


def test_proximal_regularizer_is_reported_but_not_differentiated() -> None:
    net = gated_linear([[3.0, 1.0], [4.0, 0.0]], proximal=True)
    reg = net.gate.regularizer(net)
    assert float(reg) == pytest.approx(6.0) and not reg.requires_grad


# -- test-time mask and unit counts ------------------------------------------------------
def test_mask_units_and_eval_output_equal_the_pruned_network() -> None:
    # column norms 0, 1e-6, 1e-5 (== the threshold in float32: pruned), 2e-5, 1
    weight = [[0.0, 1e-6, 1e-5, 2e-5, 0.6], [0.0, 0.0, 0.0, 0.0, 0.8]]
    net = gated_linear(weight)
    keep = [False, False, False, True, True]
    assert net.gate.gate_values().tolist() == [float(k) for k in keep]  # exactly 0 or 1
    assert net.gate.keep_mask().tolist() == keep
    assert net.gate.num_kept() == 2 and isinstance(net.gate.num_kept(), int)
    assert bbdrop.units_kept(net) == {"": 2}
    x = torch.randn(6, 5) * 1e3
    pruned = nn.Linear(2, 2)
    with torch.no_grad():
        pruned.weight.copy_(net.weight[:, torch.tensor(keep)])
        pruned.bias.copy_(net.bias)
    net.eval()
    torch.testing.assert_close(net(x), pruned(x[:, torch.tensor(keep)]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
    net.train()  # training: the identity, the pruned units included
    assert torch.equal(net(x), net.forward(x))
    net.gate.prune_(torch.tensor([True, True, True, True, False]))  # removes a kept unit
    assert net.gate.keep_mask().tolist() == [False, False, False, True, False]
    assert net.gate.gate_values().tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    net.eval()
    assert torch.equal(net.gate.mask(x), net.gate.gate_values())
    with bbdrop.mc_sampling(net):  # no posterior to sample: the same 0/1 mask
        torch.testing.assert_close(net(x), net(x * torch.tensor([0, 0, 0, 1.0, 0])))


def test_a_norm_equal_to_the_threshold_is_pruned() -> None:
    assert gated_linear([[0.5], [0.0]], threshold=0.5).gate.keep_mask().tolist() == [False]
    assert gated_linear([[0.5], [0.0]], threshold=0.4999).gate.keep_mask().tolist() == [True]


def test_conv_eval_zeroes_pruned_filters_and_keeps_the_others_exactly() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[2].zero_()
    net = bbdrop.attach_gates_(conv, "ssl").eval()
    assert net.gate.keep_mask().tolist() == [True, True, False, True]
    x = torch.randn(2, 3, 5, 5)
    y = net(x)
    assert torch.equal(y[:, 2], torch.zeros(2, 5, 5))  # the bias is gone too
    assert torch.equal(y[:, [0, 1, 3]], conv(x)[:, [0, 1, 3]])


# -- the model-level API -------------------------------------------------------------
def small_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(),
        nn.Linear(8, 3),
    )  # fmt: skip
    return bbdrop.attach_gates_(model.to(dtype), "ssl")


@pytest.mark.parametrize("scale", [0.0, 1.0, 1e4])
@pytest.mark.parametrize("batch", [1, 5])
def test_training_steps_are_finite_with_zero_huge_and_single_example_batches(
    scale: float, batch: int
) -> None:
    torch.manual_seed(6)
    model = small_model().train()
    x = torch.randn(batch, 1, 6, 6) * scale
    y = torch.randint(0, 3, (batch,))
    loss = nn.functional.cross_entropy(model(x), y) + bbdrop.total_kl(model) / 1000
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    out = model(x)
    assert torch.isfinite(out).all() and torch.equal(out, model(x))


def test_state_dict_round_trip_keeps_the_pruned_model() -> None:
    torch.manual_seed(7)
    src = small_model()
    with torch.no_grad():
        src[3].weight[:, :10] = 0.0  # ten dense inputs pruned by their norms
    src[0].gate.prune_(torch.tensor([True, False, True, True]))  # one filter for good
    dst = small_model()
    dst.load_state_dict(src.state_dict())
    assert bbdrop.units_kept(dst) == bbdrop.units_kept(src) == {"0": 3, "3": 54, "5": 8}
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_float64_model() -> None:
    model = small_model(torch.float64)
    assert bbdrop.total_kl(model).dtype == torch.float64
    assert model.eval()(torch.randn(2, 1, 6, 6, dtype=torch.float64)).dtype == torch.float64


# -- end to end: noise features lose their columns -------------------------------------------
INFORMATIVE, NOISE, N_TRAIN = 4, 12, 512


def blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in the first four features, pure noise in the other twelve."""
    y = torch.randint(0, 4, (n,), generator=gen)
    signal = 3.0 * torch.eye(INFORMATIVE)[y] + torch.randn(n, INFORMATIVE, generator=gen)
    return torch.cat([signal, torch.randn(n, NOISE, generator=gen)], dim=1), y


EPOCHS = 40  # 8 steps each: 320 steps


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        # the reference variant (subgradient); under Adam the noise columns' norms fall
        # to about 1e-3 and stay there, so the test prunes at 1e-2, not the default 1e-5
        {"kl_scale": 50.0, "threshold": 1e-2},
        # the proximal variant: exact zeros, pruned at the default threshold
        {"kl_scale": 1000.0, "proximal": True},
    ],
    ids=["subgradient", "proximal"],
)
def test_train_stage_prunes_the_noise_features(settings: dict) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = blobs(N_TRAIN, gen)
    xt, yt = blobs(512, gen)
    data = Dataset.from_tensors(x, y, xt, yt, 4)
    model = bbdrop.attach_gates_(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), "ssl", **settings
    )
    optim = OptimConfig(batch_size=64, lr=1e-2, weight_decay=0.0)
    gates = [g.gate for _, g in bbdrop.gated_layers(model)]
    history = train_stage(  # the trainer calls each gate's after_step: the proximal step
        model, data.train_batches(optim.batch_size, gen), stage="ssl", epochs=EPOCHS,
        num_train=N_TRAIN, optim=optim, evaluate_on=(xt, yt), flush_denormals=False,
    )  # fmt: skip
    first = gates[0]
    keep = first.keep_mask()
    assert keep.tolist() == [True] * INFORMATIVE + [False] * NOISE
    norms = first.group_norms().detach()
    assert norms[:INFORMATIVE].min() > 0.5
    if settings.get("proximal"):
        assert torch.equal(model[0].weight[:, INFORMATIVE:], torch.zeros(32, NOISE))
    assert history[-1].units["0"] == INFORMATIVE
    assert history[-1].error < 8.0  # the Bayes error of these blobs is about 4.5%
