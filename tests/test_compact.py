"""bbdrop.compact: the smaller network computes what the gated one computes in evaluation,
with the pruned units physically gone, on the paper's networks and on branched ones."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.compaction import CompactWarning, DependentMask, SelectFeatures, compact
from bbdrop.models import create_model

pytest.importorskip("torch_pruning")

STATIC = ("bb", "svd", "ssl", "sbp", "l0", "vib")
PAPER = {"lenet_500_300": (1, 28, 28), "lenet5_caffe": (1, 28, 28), "vgg_like": (3, 32, 32)}


def _trained_like(net: nn.Module, shape: tuple[int, ...], seed: int = 1) -> nn.Module:
    """Gates as after training: parameters moved off their initial values and about 40%
    of every gate's units pruned (``prune_``, which every method honours at test time);
    batch-norm statistics from a few batches in training mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gl in bbdrop.gated_layers(net):
            for p in gl.gate.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
            gl.gate.prune_(torch.rand(gl.gate.num_units, generator=g) > 0.4)
        net.train()
        net(torch.randn(32, *shape, generator=g))
    return net.eval()


def _no_bn_shift(net: nn.Module) -> None:
    """Batch norms whose output is 0 for a zero input: a channel zeroed before one stays
    zero, so every removal is exact (the inexact case has its own test)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.bias.zero_()
                m.running_mean.zero_()


def _width(layer: nn.Module, side: str) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features if side == "input" else layer.out_features
    return layer.in_channels if side == "input" else layer.out_channels


def _trained_dbb(net: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """``net`` with BB gates, trained-like, converted to DBB with running statistics."""
    bbdrop.convert_gates_(_trained_like(net, shape), "dbb")
    net.train()
    with torch.no_grad():
        net(torch.randn(64, *shape, generator=torch.Generator().manual_seed(3)))
    return net.eval()


def _trained_paper(model: str, method: str) -> nn.Module:
    """Paper network ``model`` with ``method``'s gates as after training (DBB: from BB)."""
    net = create_model(model, num_classes=10)
    if method == "dbb":
        return _trained_dbb(bbdrop.attach_gates_(net, "bb"), PAPER[model])
    return _trained_like(bbdrop.attach_gates_(net, method), PAPER[model])


@pytest.mark.parametrize("method", [*STATIC, "dbb"])
@pytest.mark.parametrize(  # VGG-like: seconds per method (make test runs it, not test-fast)
    "model", [pytest.param(m, marks=pytest.mark.slow) if m == "vgg_like" else m for m in PAPER]
)
def test_the_compacted_paper_networks_compute_what_the_gated_ones_do(
    model: str, method: str
) -> None:
    shape = PAPER[model]
    net = _trained_paper(model, method)
    _no_bn_shift(net)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(2))
    kept = bbdrop.units_kept(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no CompactWarning
        small = compact(net, x)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    assert not list(bbdrop.gated_layers(small))  # plain layers only
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    modules = dict(small.named_modules())
    for name, gl in bbdrop.gated_layers(net):
        width = _width(modules[name], gl.gate.bound_side())
        # the kept units, or fewer where two gates meet: a kept input feature of fc1 whose
        # convolution channel is pruned carries a zero and goes, as does a kept channel
        # of VGG's conv13 that fc1's input gates all prune
        assert width <= kept[name], name
        if model == "lenet_500_300":  # no two gates on one unit
            assert width == kept[name], name
    dense = sum(p.numel() for p in create_model(model, num_classes=10).parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.75 * dense


def _widths(net: nn.Module) -> list[int]:
    """Every layer width of a compacted network: products' inputs and outputs, the
    gathers' kept features, the DBB masks' units."""
    widths = []
    for m in net.modules():
        if isinstance(m, nn.Linear):
            widths += [m.in_features, m.out_features]
        elif isinstance(m, nn.Conv2d):
            widths += [m.in_channels, m.out_channels]
        elif isinstance(m, SelectFeatures):
            widths.append(m.index.numel())
        elif isinstance(m, DependentMask):
            widths.append(m.pi.numel())
    return widths


@pytest.mark.parametrize("method", ["bb", "dbb", "sbp"])
@pytest.mark.parametrize("model", ["lenet_500_300", "lenet5_caffe"])
def test_round_to_keeps_a_multiple_of_units_and_the_outputs(model: str, method: str) -> None:
    """round_to=8: every width that compact() cut is a multiple of 8 (the others are the
    network's own: its input, its 10 classes), the network no smaller than without
    rounding, and the outputs are the gated network's (a pruned unit kept computes its zeros)."""
    shape = PAPER[model]
    net = _trained_paper(model, method)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(2))
    plain, rounded = compact(net, x), compact(net, x, round_to=8)
    bbdrop.reset_active_units(net)
    torch.testing.assert_close(rounded(x), net(x), rtol=0, atol=1e-5)
    full = set(_widths(create_model(model, num_classes=10))) | {784}
    cut = [w for w in _widths(rounded) if w not in full]
    assert cut and all(w % 8 == 0 for w in cut), _widths(rounded)
    assert sum(p.numel() for p in rounded.parameters()) >= sum(
        p.numel() for p in plain.parameters()
    )
    with pytest.raises(ValueError, match="round_to must be a whole number of units, 1 or more"):
        compact(net, x, round_to=0)


def test_round_to_rounds_coupled_channels_together() -> None:
    """In the residual CNN the addition couples the stem's and conv_b's channels: with
    round_to=4 they keep 4 of 8 together (2 pruned by both gates would leave 6)."""
    net = _trained_like(bbdrop.attach_gates_(_ResidualCNN(), "bb"), (3, 8, 8))
    for _, gl in bbdrop.gated_layers(net):
        gl.gate.static_keep.fill_(True)
    _no_bn_shift(net)
    for gate in (net.stem.gate, net.conv_b.gate):
        _prune(gate, [0, 1, 2, 3, 5])
    x = torch.randn(5, 3, 8, 8)
    small = compact(net, x, round_to=4)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    assert (small.stem.out_channels, small.conv_b.out_channels, small.bn0.num_features) == (4, 4, 4)
    assert small.conv_a.in_channels == 4 and small.fc.in_features == 4 * 16


def test_fc1_of_lenet5_reads_only_kept_features_of_kept_channels() -> None:
    """LeNet5's fc1 gate works on the 800 flattened features (50 channels x 16
    positions): a channel of conv2 goes when conv2's gate or all 16 of its fc1 gates
    prune it, a single feature by a gather in front of fc1."""
    net = bbdrop.attach_gates_(create_model("lenet5_caffe", num_classes=10), "l0").eval()
    conv2, fc1 = net.conv2.gate, net.fc1.gate
    keep_conv = torch.ones(50, dtype=torch.bool)
    keep_conv[[0, 1]] = False  # conv2's gate prunes channels 0 and 1
    keep_fc = torch.ones(800, dtype=torch.bool)
    keep_fc[2 * 16 : 3 * 16] = False  # fc1's gates prune all of channel 2
    keep_fc[3 * 16 + 5] = False  # and one position of channel 3
    conv2.prune_(keep_conv)
    fc1.prune_(keep_fc)
    x = torch.randn(4, 1, 28, 28)
    small = compact(net, x)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    assert small.conv2.out_channels == 47
    assert isinstance(small.fc1, nn.Linear) and small.fc1.in_features == 47 * 16 - 1
    assert isinstance(small.fc1.select, SelectFeatures) and small.fc1.select.dim == -1


class _ResidualCNN(nn.Module):
    """stem -> [conv_a -> bn -> relu -> conv_b -> bn] + stem -> relu -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 8, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        r = self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(h)))))
        out = nn.functional.max_pool2d(torch.relu(h + r), 2)
        return self.fc(out.flatten(1))


class _SkipMLP(nn.Module):
    """fc_in -> h; h + fc_b(relu(fc_a(h))) -> relu -> fc_out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(12, 10)
        self.fc_a = nn.Linear(10, 7)
        self.fc_b = nn.Linear(7, 10)
        self.fc_out = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc_in(x))
        return self.fc_out(torch.relu(h + self.fc_b(torch.relu(self.fc_a(h)))))


def _prune(gate: bbdrop.Gate, units: list[int]) -> None:
    keep = torch.ones(gate.num_units, dtype=torch.bool)
    keep[units] = False
    gate.prune_(keep)


@pytest.mark.parametrize("method", STATIC)
def test_a_residual_channel_goes_only_when_every_gate_on_it_prunes_it(method: str) -> None:
    """The addition couples the stem's and conv_b's output channels: channel 1 is pruned
    by both gates and goes from stem, conv_b, both batch norms, conv_a's input and
    fc's inputs; channel 4, pruned by the stem's gate only, stays."""
    net = _trained_like(bbdrop.attach_gates_(_ResidualCNN(), method), (3, 8, 8))
    for _, gl in bbdrop.gated_layers(net):  # undo the random pruning: these tests choose
        gl.gate.static_keep.fill_(True)
    _no_bn_shift(net)
    _prune(net.stem.gate, [1, 4])
    _prune(net.conv_b.gate, [1])
    _prune(net.conv_a.gate, [2])  # an ordinary channel inside the block
    x = torch.randn(5, 3, 8, 8)
    small = compact(net, x)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    assert (small.stem.out_channels, small.conv_b.out_channels) == (7, 7)
    assert (small.bn0.num_features, small.bn_b.num_features) == (7, 7)
    assert (small.conv_a.in_channels, small.conv_a.out_channels, small.bn_a.num_features) == (
        7, 5, 5)  # fmt: skip
    assert small.conv_b.in_channels == 5
    # the kept channels' 16 features each, less those fc's own gate prunes (VIB's rule
    # on its trained-like parameters prunes one); a gather in front of fc drops them
    read = net.fc.gate.keep_mask().reshape(8, 16)[[c for c in range(8) if c != 1]]
    assert small.fc.in_features == int(read.sum())


@pytest.mark.parametrize("method", STATIC)
def test_a_skip_connection_unit_goes_only_when_every_reader_ignores_it(method: str) -> None:
    """h feeds fc_a and, through the addition, fc_out: unit 3 of h, pruned by both their
    input gates, goes from fc_in and fc_b's outputs too; unit 6, pruned by fc_a's gate
    only, stays in h and is skipped by a gather in front of fc_a."""
    net = _trained_like(bbdrop.attach_gates_(_SkipMLP(), method), (12,))
    for _, gl in bbdrop.gated_layers(net):
        gl.gate.static_keep.fill_(True)
    _prune(net.fc_a.gate, [3, 6])
    _prune(net.fc_out.gate, [3])
    _prune(net.fc_in.gate, [0, 11])  # pixels of the input: gathered
    x = torch.randn(7, 12)
    small = compact(net, x)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    assert (small.fc_in.in_features, small.fc_in.out_features) == (10, 9)
    assert small.fc_b.out_features == 9 and small.fc_out.in_features == 9
    assert isinstance(small.fc_a.select, SelectFeatures) and small.fc_a.in_features == 8


@pytest.mark.parametrize("model", ["residual", "skip"])
def test_dbb_on_the_branched_models_computes_what_the_gated_one_does(model: str) -> None:
    """DBB on the residual CNN and the skip MLP: the pruned units go (coupled ones
    together) and the masks stay on the rest, with the gated network's outputs."""
    net, shape = (_ResidualCNN(), (3, 8, 8)) if model == "residual" else (_SkipMLP(), (12,))
    net = _trained_dbb(bbdrop.attach_gates_(net, "bb"), shape)
    _no_bn_shift(net)
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no CompactWarning
        small = compact(net, x)
    bbdrop.reset_active_units(net)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    assert any(isinstance(m, DependentMask) for m in small.modules())
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for n, p in net.named_parameters() if ".gate." not in n
    )


def test_a_constant_channel_into_a_padded_convolution_is_reported_with_its_error() -> None:
    """A gate before batch norm leaves the BN shift as a constant channel; folded into the
    next padded convolution's bias it is wrong at the borders, and compact() says by how
    much (measured on the example, equal to what the caller measures)."""
    net = bbdrop.attach_gates_(_ResidualCNN(), "bb").eval()
    _no_bn_shift(net)
    _prune(net.conv_a.gate, [2])
    with torch.no_grad():
        net.bn_a.bias[2] = 0.7  # relu(0.7): a constant 0.7 into the padded conv_b
    x = torch.randn(5, 3, 8, 8)
    with pytest.warns(CompactWarning, match=r"by up to (\S+) .* convolution\(s\) conv_b") as rec:
        small = compact(net, x)
    with torch.no_grad():
        measured = float((small(x) - net(x)).abs().max())
    assert measured > 1e-4
    assert f"{measured:.3g}" in str(rec[0].message)
    # the fold is exact away from the borders: conv_b's output inside the image matches
    inner = {}
    for model, key in ((net, "gated"), (small, "small")):
        hook = model.conv_b.register_forward_hook(
            lambda m, a, out, k=key: inner.__setitem__(k, out)
        )
        model(x)
        hook.remove()
    torch.testing.assert_close(inner["small"][..., 1:-1, 1:-1], inner["gated"][..., 1:-1, 1:-1],
                               rtol=0, atol=1e-5)  # fmt: skip


def test_dbb_keeps_its_input_dependent_mask_on_the_kept_units() -> None:
    """The units DBB's BB part prunes go; the rest keep DBB's mask, a plain module that
    switches on as many units per example as the gate did."""
    net = _trained_dbb(bbdrop.attach_gates_(create_model("lenet5_caffe", num_classes=10), "bb"),
                       (1, 28, 28))  # fmt: skip
    x = torch.randn(16, 1, 28, 28)
    small = compact(net, x)
    bbdrop.reset_active_units(net)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    assert not list(bbdrop.gated_layers(small))
    masks = {n.rpartition(".")[0]: m for n, m in small.named_modules()
             if isinstance(m, DependentMask)}  # fmt: skip
    assert set(masks) == {"conv1", "conv2", "fc1", "fc2"}
    assert (
        masks["conv1"].pi.numel() == small.conv1.out_channels == bbdrop.units_kept(net)["conv1"]
    )
    active: dict[str, float] = {}
    for name, mask in masks.items():
        mask.register_forward_hook(
            lambda m, args, out, n=name: active.__setitem__(n, float((m.mask(args[0]) != 0).sum()))
        )
    small(x)
    gate_active = bbdrop.active_units(net)
    # conv1's channels go only where its own gate prunes them: the same units switch on;
    # elsewhere a unit the mask keeps can still go (fc1's features of a pruned conv2
    # channel carry zero), so fewer do
    assert active["conv1"] / len(x) == pytest.approx(gate_active["conv1"])
    for name, value in gate_active.items():
        assert 0 < active[name] / len(x) <= value + 1e-9, name
    keep = net.conv1.gate.keep_mask()
    expected = bbdrop.collect_masks(net, x)["conv1"][:, keep]
    raw = small.conv1.forward(x)  # the convolution alone, without the mask its hook applies
    torch.testing.assert_close(masks["conv1"].mask(raw), expected, rtol=0, atol=0)


def test_bad_models_are_refused_with_what_to_do() -> None:
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match="has no bbdrop gates: attach them"):
        compact(create_model("lenet5_caffe", num_classes=10), x)
    net = bbdrop.attach_gates_(create_model("lenet5_caffe", num_classes=10), "bb")
    net.conv2.gate.prune_(torch.zeros(50, dtype=torch.bool))
    with pytest.raises(ValueError, match="'conv2' keeps no unit: the model is untrained or"):
        compact(net, x)
    net = bbdrop.attach_gates_(create_model("lenet5_caffe", num_classes=10), "bb")
    bbdrop.convert_gates_(net, "dbb")  # not trained: no running statistics
    with pytest.raises(ValueError, match=r"DBB gate 'conv1' has no running statistics .* train"):
        compact(net, x)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    bbdrop.attach_gates_(mlp, "bb")
    _prune(mlp[2].gate, [0])
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\) lies on the path .* Linear, Conv2d"):
        compact(mlp, torch.randn(3, 4))


# -- networks that are not the paper's (found in review) ----------------------------------
def _gate(net: nn.Module, method: str = "bb", only: str | None = None) -> nn.Module:
    keep = None if only is None else (lambda name, m: name == only)
    return bbdrop.attach_gates_(net, method, filter_fn=keep).eval()


class _TwoLayers(nn.Module):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), out

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.fc1(x)
        if self.out == "mean":  # a contribution to h's units from no layer
            return self.fc2(torch.relu(h) + x.mean(1, keepdim=True))
        if self.out == "residual":  # h reaches the output
            return self.fc2(torch.relu(h)) + h
        return self.fc2(torch.relu(h)), h  # two outputs


def test_a_unit_with_a_contribution_from_no_layer_is_kept() -> None:
    """fc1 emits zero on unit 1, but x.mean adds to it: the unit is not constant across
    the examples, so it stays (with one example it would look constant: refused)."""
    net = _gate(_TwoLayers("mean"), only="fc2")
    with torch.no_grad():
        net.fc1.weight[1] = 0
        net.fc1.bias[1] = 0
    with pytest.raises(ValueError, match=r"at least 2 inputs \(got shape \(1, 4\)\)"):
        compact(net, torch.randn(1, 4))
    small = compact(net, torch.randn(8, 4))
    x = torch.randn(6, 4)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-6)
    assert small.fc1.out_features == 4


def test_units_that_reach_the_output_stay_and_other_outputs_are_refused() -> None:
    net = _gate(_TwoLayers("residual"), only="fc2")
    _prune(net.fc2.gate, [1])  # fc2 ignores unit 1 of h, but h is added to the output
    x = torch.randn(6, 4)
    torch.testing.assert_close(compact(net, x)(x), net(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one tensor as output, got tuple"):
        compact(_gate(_TwoLayers("tuple"), only="fc2"), x)
    with pytest.raises(ValueError, match="not one gated layer: wrap it"):
        compact(bbdrop.attach_gates_(nn.Linear(4, 3), "bb"), x)


def test_a_constant_into_a_dbb_masked_layer_is_not_folded() -> None:
    """conv (its DBB gate prunes channel 1) -> batch norm (shift 0.8) -> flatten -> fc
    with a DBB gate on its input: the mask scales the constant per example, so the
    channel cannot be folded into fc's bias; it stays, and the result is exact."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))

    net = bbdrop.attach_gates_(Net(), "bb")
    _prune(net.conv.gate, [1])
    bbdrop.convert_gates_(net, "dbb")
    net.train()(torch.randn(16, 2, 4, 4))
    net.eval()
    with torch.no_grad():
        net.bn.bias[1] = 0.8
    x = torch.randn(8, 2, 4, 4)
    small = compact(net, x)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-6)
    assert small.conv.out_channels == 3  # kept: its constant goes through fc's mask


def test_grouped_convolutions_unused_layers_other_norms_and_mc_sampling() -> None:
    """A grouped convolution and a GroupNorm in the ungated part, a head used only in
    training, and Monte-Carlo sampling switched on: none of it gets in the way."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.norm = nn.GroupNorm(2, 8)
            self.head = nn.Conv2d(8, 6, 1)
            self.fc = nn.Linear(6, 4)
            self.aux = nn.Linear(8, 4)  # a training-only head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.norm(self.grouped(torch.relu(self.stem(x)))))
            return self.fc(torch.relu(self.head(h)).mean((2, 3)))

    net = _gate(Net(), only="head")
    _prune(net.head.gate, [0, 4])
    x = torch.randn(5, 3, 6, 6)
    with bbdrop.mc_sampling(net):
        small = compact(net, x)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-6)
    assert small.head.out_channels == 4 and small.grouped.groups == 2
