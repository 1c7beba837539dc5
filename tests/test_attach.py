"""Putting gates into models, and the model-level helpers."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop import gate_layer_


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


class SmallConvNet(nn.Module):
    """A user's model with nesting and functional flattening."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Sequential(nn.Conv2d(4, 5, 3), nn.ReLU()),
        )
        self.head = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def test_dense_layers_are_gated_on_their_inputs() -> None:
    net = bbdrop.attach_gates_(mlp(), "bb")
    layers = dict(bbdrop.gated_layers(net))
    assert list(layers) == ["0", "2", "4"]
    assert [g.gate.num_units for g in layers.values()] == [12, 8, 6]
    assert all(g.gate.bound_side() == "input" for g in layers.values())
    assert net(torch.randn(5, 12)).shape == (5, 3)


def test_convolutions_are_gated_on_their_outputs_before_batch_norm() -> None:
    net = bbdrop.attach_gates_(SmallConvNet(), "dbb")
    layers = dict(bbdrop.gated_layers(net))
    assert list(layers) == ["features.0", "features.4.0", "head"]
    assert [(g.gate.bound_side(), g.gate.num_units) for g in layers.values()] == [
        ("output", 4),
        ("output", 5),
        ("input", 20),
    ]
    assert isinstance(net.features[1], nn.BatchNorm2d)  # the gate sits before BN
    assert net(torch.randn(2, 1, 10, 10)).shape == (2, 3)


@pytest.mark.parametrize("side", ["input", "output"])
def test_gated_layer_applies_the_gate_on_its_side(side: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    gate = bbdrop.create_gate("bb", 4).eval()
    x = torch.randn(3, 4)
    expected = layer(gate(x)) if side == "input" else gate(layer(x))
    torch.testing.assert_close(gate_layer_(layer, gate, side)(x), expected)  # type: ignore[arg-type]


def test_gated_layer_rejects_bad_side_and_non_gates() -> None:
    with pytest.raises(ValueError, match="side"):
        gate_layer_(nn.Linear(2, 2), bbdrop.create_gate("bb", 2), "middle")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Gate"):
        gate_layer_(nn.Linear(2, 2), nn.Identity(), "input")  # type: ignore[arg-type]


def test_filter_fn_selects_layers() -> None:
    net = bbdrop.attach_gates_(mlp(), filter_fn=lambda name, m: m.out_features != 3)
    assert [n for n, _ in bbdrop.gated_layers(net)] == ["0", "2"]
    assert isinstance(net[4], nn.Linear)


def test_gate_kwargs_and_conv_kl_scale() -> None:
    net = bbdrop.attach_gates_(SmallConvNet(), "bb", conv_kl_scale=0.1, threshold=0.05)
    layers = dict(bbdrop.gated_layers(net))
    assert [g.gate.kl_scale for g in layers.values()] == [0.1, 0.1, 1.0]
    assert all(g.gate.threshold == 0.05 for g in layers.values())


def test_a_single_layer_model_becomes_a_gated_layer() -> None:
    layer = nn.Linear(3, 2)
    out = bbdrop.attach_gates_(layer)
    assert out is layer and bbdrop.is_gated(out) and out.gate.num_units == 3


def test_gates_follow_the_layer_dtype() -> None:
    net = bbdrop.attach_gates_(mlp().double())
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert net(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64


def test_attaching_twice_or_an_unknown_gate_fails_without_touching_the_model() -> None:
    net = mlp()
    with pytest.raises(ValueError, match="unknown gate 'nope'"):
        bbdrop.attach_gates_(net, "nope")
    assert not list(bbdrop.gated_layers(net))
    bbdrop.attach_gates_(net)
    with pytest.raises(ValueError, match="already gated"):
        bbdrop.attach_gates_(net)


def test_a_partly_gated_model_is_refused_without_gating_the_rest() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    net[2] = bbdrop.attach_gates_(net[2])  # the last layer gated by hand
    with pytest.raises(ValueError, match="'2' is already gated"):
        bbdrop.attach_gates_(net)
    assert isinstance(net[0], nn.Linear)  # the check came before the first change


def test_nothing_to_gate_is_an_error_naming_what_was_looked_for() -> None:
    with pytest.raises(ValueError, match=r"no layer to gate: Sequential has no nn.Linear, "
                       r"nn.Conv1d, nn.Conv2d, nn.Conv3d \(exact types"):  # fmt: skip
        bbdrop.attach_gates_(nn.Sequential(nn.ReLU(), nn.Flatten()))
    net = mlp()
    with pytest.raises(ValueError, match=r"nn\.Conv3d that filter_fn accepts"):
        bbdrop.attach_gates_(net, filter_fn=lambda name, layer: name == "nonesuch")
    assert not list(bbdrop.gated_layers(net))


@pytest.mark.parametrize("name", ["bb", "dbb"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_gate_refuses_integer_input_with_the_fix(name: str, dtype: torch.dtype) -> None:
    gate = bbdrop.create_gate(name, 3)
    for mode in (gate.train, gate.eval):
        mode()
        with pytest.raises(ValueError, match=f"expects floating-point input, got {dtype}; "
                           r"convert it first, e.g. x.float\(\)"):  # fmt: skip
            gate(torch.ones(2, 3, dtype=dtype))


def test_linear_subclasses_used_by_weight_are_left_alone() -> None:
    """nn.MultiheadAttention reads out_proj.weight directly; wrapping it would break it."""

    class WithAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x)[0].mean(1))

    net = bbdrop.attach_gates_(WithAttention())
    assert [n for n, _ in bbdrop.gated_layers(net)] == ["head"]
    assert net(torch.randn(2, 5, 8)).shape == (2, 2)


def test_total_kl_and_units_kept() -> None:
    net = bbdrop.attach_gates_(mlp(), kl_scale=0.5)
    gates = [g.gate for _, g in bbdrop.gated_layers(net)]
    expected = sum(0.5 * g.kl() for g in gates)
    torch.testing.assert_close(bbdrop.total_kl(net), expected)
    assert bbdrop.units_kept(net) == {"0": 12, "2": 8, "4": 6}
    with torch.no_grad():
        gates[1].b_raw[:3] = 50.0  # E[pi] -> ~0: three units of layer "2" pruned
        gates[1].a_raw[:3] = -10.0
    assert bbdrop.units_kept(net) == {"0": 12, "2": 5, "4": 6}
    assert bbdrop.total_kl(mlp()).item() == 0.0


def test_convert_gates_to_dbb_for_the_second_stage() -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(mlp(), "bb")
    with torch.no_grad():
        for _, g in bbdrop.gated_layers(net):
            g.gate.a_raw.normal_()
    values = {n: g.gate.gate_values() for n, g in bbdrop.gated_layers(net)}
    bbdrop.convert_gates_(net, "dbb", freeze_bb=True)
    for n, g in bbdrop.gated_layers(net):
        assert isinstance(g.gate, bbdrop.DependentBetaBernoulliGate) and g.gate.bb_frozen
        torch.testing.assert_close(g.gate.gate_values(), values[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no gates"):
        bbdrop.convert_gates_(mlp(), "dbb")
    with pytest.raises(ValueError, match="unknown gate"):
        bbdrop.convert_gates_(net, "nope")


def test_state_dict_round_trip_through_bytes() -> None:
    torch.manual_seed(0)
    src = bbdrop.convert_gates_(bbdrop.attach_gates_(SmallConvNet()), "dbb")
    src.train()(torch.randn(4, 1, 10, 10))
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = bbdrop.convert_gates_(bbdrop.attach_gates_(SmallConvNet()), "dbb")
    dst.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 1, 10, 10)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_mc_predict_averages_sampled_softmaxes() -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(mlp()).train()
    x = torch.randn(6, 12)
    p = bbdrop.mc_predict(net, x, num_samples=20)
    assert p.shape == (6, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(6))
    assert net.training  # restored
    assert not any(g.gate.mc_sampling for _, g in bbdrop.gated_layers(net))
    deterministic = net.eval()(x).softmax(-1)
    assert not torch.allclose(p, deterministic)
    with pytest.raises(ValueError, match="num_samples"):
        bbdrop.mc_predict(net, x, num_samples=0)


def test_mc_sampling_context_restores_flags_after_an_error() -> None:
    net = bbdrop.attach_gates_(mlp())
    with pytest.raises(RuntimeError), bbdrop.mc_sampling(net):
        assert all(g.gate.mc_sampling for _, g in bbdrop.gated_layers(net))
        raise RuntimeError
    assert not any(g.gate.mc_sampling for _, g in bbdrop.gated_layers(net))


def test_collect_masks_gives_each_examples_test_time_mask() -> None:
    torch.manual_seed(0)
    net = bbdrop.convert_gates_(bbdrop.attach_gates_(SmallConvNet()), "dbb").train()
    x = torch.randn(7, 1, 10, 10)
    masks = bbdrop.collect_masks(net, x, batch_size=3)
    assert net.training  # mode restored
    assert {k: tuple(v.shape) for k, v in masks.items()} == {
        "features.0": (7, 4),
        "features.4.0": (7, 5),
        "head": (7, 20),
    }
    # the first gate's mask, recomputed from its input by hand
    gate = net.features[0].gate.eval()
    h = net.features[0].forward(x)
    torch.testing.assert_close(masks["features.0"], gate.mask(h))
    with pytest.raises(ValueError, match="eval mode"):
        gate.active_units()  # the statistics were left alone
    bb = bbdrop.attach_gates_(mlp())
    m = bbdrop.collect_masks(bb, torch.randn(4, 12))["0"]
    assert torch.equal(m, bb[0].gate.gate_values().expand(4, -1))


def test_units_ever_active_and_preprune() -> None:
    torch.manual_seed(0)
    net = bbdrop.convert_gates_(bbdrop.attach_gates_(mlp()), "dbb").eval()
    gate = net[0].gate
    with torch.no_grad():
        gate.scale.fill_(1.0)
        gate.shift.fill_(0.0)  # phi = clamp(x): a unit is active only where x > 0
    x = torch.randn(50, 12)
    x[:, 3] = -torch.rand(50)  # unit 3 of the first layer is never switched on
    ever = bbdrop.units_ever_active(net, x, batch_size=20)
    masks = bbdrop.collect_masks(net, x)
    for name, m in masks.items():
        assert torch.equal(ever[name], (m != 0).any(dim=0)), name
    assert not ever["0"][3] and ever["0"].sum() == 11
    before = net(x)
    bbdrop.prune_units_(net, ever)
    assert gate.num_kept() == 11
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)  # no change on these inputs
    with pytest.raises(ValueError, match=r"bool tensor of shape \(12,\)"):
        gate.prune_(torch.ones(11, dtype=torch.bool))
    with pytest.raises(ValueError, match="'9', which is not a gated layer"):
        bbdrop.prune_units_(net, {"9": ever["0"]})


@pytest.mark.parametrize("name", ["bb", "dbb"])
def test_monte_carlo_masks_keep_removed_units_removed(name: str) -> None:
    """Units below BB's threshold or removed by pre-pruning stay off in mc_predict."""
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(mlp(), "bb")
    if name == "dbb":
        bbdrop.convert_gates_(net, "dbb")
    gate = net[0].gate
    with torch.no_grad():
        gate.a_raw[2] = -10.0  # E[pi] far below the threshold: pruned by BB's rule
        gate.a_raw[5] = 5.0  # pi close to 1: sampled masks are mostly 1
    gate.prune_(torch.arange(12) != 5)  # ... but removed for good
    assert not gate.keep_mask()[2] and not gate.keep_mask()[5]
    seen = []
    hook = gate.register_forward_hook(lambda m, i, out: seen.append(out[:, [2, 5]].clone()))
    bbdrop.mc_predict(net, torch.randn(200, 12).abs() + 1, num_samples=20)
    hook.remove()
    assert len(seen) == 20 and all(torch.equal(o, torch.zeros_like(o)) for o in seen)


def test_converting_gates_twice_is_refused_and_changes_nothing() -> None:
    net = bbdrop.convert_gates_(bbdrop.attach_gates_(mlp()), "dbb")
    with torch.no_grad():
        net[0].gate.scale.fill_(3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"'0' is a 'dbb' gate already.*re-initialise"):
        bbdrop.convert_gates_(net, "dbb")
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
