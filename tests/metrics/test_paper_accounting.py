"""The paper's FLOP and memory accounting, against hand arithmetic."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbdrop
from bbdrop.metrics import (
    batch_norm_memory,
    conv2d_flops,
    conv2d_memory,
    dbb_conv2d_flops,
    dbb_linear_flops,
    dbb_memory,
    layer_costs,
    linear_flops,
    linear_memory,
    max_pool_flops,
    memory_fraction,
    paper_costs,
    paper_flops,
    paper_memory,
    speedup,
    trace_layers,
)
from bbdrop.models import create_model


class SmallConvNet(nn.Module):
    """conv 1->4 3x3 (8x8 -> 6x6), BN, ReLU, max-pool 2 (-> 3x3), conv 4->6 3x3 pad 1,
    ReLU, flatten (54 = 6 x 3 x 3), dense 54-5, ReLU, dense 5-3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc1 = nn.Linear(54, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))  # (N, 4, 3, 3)
        x = torch.flatten(F.relu(self.conv2(x)), 1)  # (N, 54)
        return self.fc2(F.relu(self.fc1(x)))  # (N, 3)


def small_layers() -> list:
    return trace_layers(SmallConvNet(), torch.zeros(1, 1, 8, 8))


def lenet300_layers() -> list:
    return trace_layers(create_model("lenet_500_300"), torch.zeros(1, 784))


def paper_dbb_cost(num_units: float, spatial: tuple[int, int] | None) -> tuple[float, float]:
    """DBB's run-time cost from the paper's formulas, written out here
    as an independent reference: 5K FLOPs on a dense input, 2HWK + 4K on a conv output,
    4K values of memory."""
    if spatial is None:
        return 5 * num_units, 4 * num_units
    h, w = spatial
    return 2 * h * w * num_units + 4 * num_units, 4 * num_units


@cache
def network_layers(name: str, num_classes: int = 10) -> tuple:
    """Traced once per session: the records are immutable."""
    shape = (1, 3, 32, 32) if name == "vgg_like" else (1, 1, 28, 28)
    return tuple(trace_layers(create_model(name, num_classes=num_classes), torch.zeros(shape)))


# -- the formulas ------------------------------------------------------------------
def test_linear_flops() -> None:
    assert linear_flops(784, 500) == (2 * 784 - 1) * 500 + 500 + 500
    assert linear_flops(300, 10, activation=False) == (2 * 300 - 1) * 10 + 10
    assert linear_flops(300, 10, bias=False, activation=False) == (2 * 300 - 1) * 10


def test_conv2d_flops() -> None:
    # (2 k k in - 1) H W out + H W out (bias) + H W out (activation)
    assert conv2d_flops(20, 50, 5, (8, 8)) == (2 * 5 * 5 * 20 - 1) * 8 * 8 * 50 + 2 * 8 * 8 * 50
    assert conv2d_flops(3, 2, (3, 1), (4, 5), bias=False) == (2 * 3 * 1 * 3 - 1) * 20 * 2 + 20 * 2


def test_max_pool_and_dbb_flops() -> None:
    assert max_pool_flops(20, 2, (12, 12)) == 2 * 2 * 12 * 12 * 20
    assert dbb_linear_flops(300) == 5 * 300
    assert dbb_conv2d_flops(50, (8, 8)) == 2 * 8 * 8 * 50 + 4 * 50


def test_memory_formulas() -> None:
    assert linear_memory(800, 500) == 800 * 500 + 500
    assert linear_memory(800, 500, bias=False) == 800 * 500
    # weights, biases, im2col buffer k k in H_out W_out
    assert conv2d_memory(20, 50, 5, (8, 8)) == 25 * 20 * 50 + 50 + 25 * 20 * 64
    assert conv2d_memory(20, 50, 5, (8, 8), im2col=False) == 25 * 20 * 50 + 50
    assert batch_norm_memory(64) == 2 * 64
    assert dbb_memory(36) == 4 * 36


def test_all_inputs_pruned_costs_only_bias_and_activation() -> None:
    assert linear_flops(0, 7) == 7 + 7
    assert conv2d_flops(0, 2, 3, (2, 2)) == 2 * 4 * 2


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, True, "3"])
def test_formulas_reject_bad_counts(bad: object) -> None:
    with pytest.raises(ValueError, match="in_features must be a finite number >= 0"):
        linear_flops(bad, 3)  # type: ignore[arg-type]


def test_formulas_reject_bad_sizes() -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        conv2d_flops(1, 1, (3, 3, 3), (2, 2))  # type: ignore[arg-type]


# -- whole networks, dense ----------------------------------------------------------
def test_lenet_500_300_dense() -> None:
    layers = lenet300_layers()
    flops = (
        (2 * 784 - 1) * 500 + 500 + 500  # fc1: multiply-adds, bias, ReLU
        + (2 * 500 - 1) * 300 + 300 + 300  # fc2
        + (2 * 300 - 1) * 10 + 10  # fc3: logits, no activation
    )  # fmt: skip
    assert flops == 1_090_800
    assert paper_flops(layers) == flops
    memory = 784 * 500 + 500 + 500 * 300 + 300 + 300 * 10 + 10
    assert paper_memory(layers) == memory == 545_810


def test_small_conv_net_dense() -> None:
    layers = small_layers()
    assert [(r.name, r.kind) for r in layers] == [
        ("conv1", "conv2d"), ("bn1", "batchnorm"), ("pool", "maxpool"),
        ("conv2", "conv2d"), ("fc1", "linear"), ("fc2", "linear"),
    ]  # fmt: skip
    flops = (
        (2 * 9 * 1 - 1) * 6 * 6 * 4 + 2 * 6 * 6 * 4  # conv1: 4 maps of 6x6
        + 2 * 2 * 4 * 3 * 3  # max-pool: 4 FLOPs per output
        + (2 * 9 * 4 - 1) * 3 * 3 * 6 + 2 * 3 * 3 * 6  # conv2: 6 maps of 3x3
        + (2 * 54 - 1) * 5 + 5 + 5  # fc1
        + (2 * 5 - 1) * 3 + 3  # fc2
    )  # fmt: skip
    assert flops == 7397
    assert paper_flops(layers) == flops
    weights = 9 * 4 + 4 + 2 * 4 + 9 * 4 * 6 + 6 + 54 * 5 + 5 + 5 * 3 + 3  # incl. BN's 2 per channel
    im2col = 9 * 1 * 6 * 6 + 9 * 4 * 3 * 3
    assert paper_memory(layers) == weights + im2col == 1211
    assert paper_memory(layers, im2col=False) == weights == 563


def test_lenet5_caffe_dense() -> None:
    layers = network_layers("lenet5_caffe")
    flops = (
        (2 * 25 - 1) * 24 * 24 * 20 + 2 * 24 * 24 * 20  # conv1
        + 4 * 20 * 12 * 12  # pool1
        + (2 * 25 * 20 - 1) * 8 * 8 * 50 + 2 * 8 * 8 * 50  # conv2
        + 4 * 50 * 4 * 4  # pool2
        + (2 * 800 - 1) * 500 + 500 + 500  # fc1
        + (2 * 500 - 1) * 10 + 10  # fc2
    )  # fmt: skip
    assert paper_flops(layers) == flops == 4_615_940
    memory = (
        25 * 20 + 20 + 25 * 24 * 24  # conv1 with its im2col buffer
        + 25 * 20 * 50 + 50 + 25 * 20 * 8 * 8  # conv2
        + 800 * 500 + 500 + 500 * 10 + 10
    )  # fmt: skip
    assert paper_memory(layers) == memory == 477_480


def test_vgg_like_dense_matches_a_layer_by_layer_sum() -> None:
    layers = network_layers("vgg_like")
    widths = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"]
    widths += [512, 512, 512, "M"]
    flops, memory, c_in, size = 0, 0, 3, 32
    for w in widths:
        if w == "M":
            size //= 2
            flops += 4 * c_in * size * size
            continue
        flops += (2 * 9 * c_in - 1) * size * size * w + 2 * size * size * w
        memory += 9 * c_in * w + w + 2 * w + 9 * c_in * size * size
        c_in = w
    flops += (2 * 512 - 1) * 512 + 2 * 512 + (2 * 512 - 1) * 10 + 10
    memory += 512 * 512 + 512 + 2 * 512 + 512 * 10 + 10
    assert paper_flops(layers) == flops == 627_329_536
    assert paper_memory(layers) == memory == 16_660_042


@pytest.mark.parametrize("name", ["lenet_500_300", "lenet5_caffe", "vgg_like"])
def test_dense_network_has_speedup_one(name: str) -> None:
    layers = network_layers(name)
    assert speedup(layers) == 1.0
    assert memory_fraction(layers) == 1.0
    assert speedup(layers, {}) == 1.0


def test_fresh_gates_keep_every_unit() -> None:
    net = bbdrop.attach_gates_(create_model("lenet5_caffe"), "bb")
    costs = paper_costs(net, torch.zeros(1, 1, 28, 28))  # units: the gates' keep masks
    assert costs.flops == costs.full_flops == 4_615_940
    assert costs.speedup == 1.0
    assert costs.memory_fraction == 1.0


# -- pruned ------------------------------------------------------------------------
def test_pruned_lenet_500_300() -> None:
    """A gate on a dense layer's input shrinks that layer's ``in`` and the previous ``out``."""
    layers = lenet300_layers()
    units = {"fc1": 300, "fc2": 100, "fc3": 50}
    flops = (
        (2 * 300 - 1) * 100 + 100 + 100  # fc1: 300 inputs kept, 100 outputs needed by fc2
        + (2 * 100 - 1) * 50 + 50 + 50
        + (2 * 50 - 1) * 10 + 10
    )  # fmt: skip
    memory = 300 * 100 + 100 + 100 * 50 + 50 + 50 * 10 + 10
    assert paper_flops(layers, units) == flops == 71150
    assert paper_memory(layers, units) == memory == 35660
    assert speedup(layers, units) == pytest.approx(1_090_800 / 71150, rel=1e-12)
    assert memory_fraction(layers, units) == pytest.approx(35660 / 545_810, rel=1e-12)
    assert [(c.name, c.in_units, c.out_units) for c in layer_costs(layers, units)] == [
        ("fc1", 300, 100),
        ("fc2", 100, 50),
        ("fc3", 50, 10),
    ]


def test_units_kept_of_a_gated_model_are_accepted() -> None:
    net = bbdrop.attach_gates_(create_model("lenet_500_300"), "bb")
    with torch.no_grad():
        net.fc2.gate.a_raw[:400] = -10.0  # E[pi] tiny: pruned
    kept = bbdrop.units_kept(net)
    assert kept == {"fc1": 784, "fc2": 100, "fc3": 300}
    costs = paper_costs(net, torch.zeros(1, 784))  # units from the gates' keep masks
    assert costs.flops == paper_flops(lenet300_layers(), kept)
    assert costs.flops == (2 * 784 - 1) * 100 + 200 + (2 * 100 - 1) * 300 + 600 + 5990 + 10


def test_conv_to_flatten_to_dense_with_masks_is_exact() -> None:
    """A flattened feature lives only if its own gate and its channel's gate keep it;
    a channel is computed only if one of its features lives."""
    layers = small_layers()
    conv1 = torch.tensor([True, True, False, True])
    conv2 = torch.tensor([True, True, True, False, False, False])
    fc1 = torch.zeros(54, dtype=torch.bool)
    fc1[0:9] = True  # all 9 features of channel 0
    fc1[9] = True  # one feature of channel 1
    fc1[27:36] = True  # channel 3: its conv gate is off
    # channel 2 is kept by conv2's gate, but fc1 keeps none of its features.
    units = {"conv1": conv1, "conv2": conv2, "fc1": fc1, "fc2": 2}
    costs = {c.name: c for c in layer_costs(layers, units)}
    assert (costs["conv2"].in_units, costs["conv2"].out_units) == (3, 2)
    assert costs["fc1"].in_units == 9 + 1
    flops = (
        (2 * 9 * 1 - 1) * 36 * 3 + 2 * 36 * 3  # conv1: 3 channels
        + 4 * 3 * 9  # pool on 3 channels
        + (2 * 9 * 3 - 1) * 9 * 2 + 2 * 9 * 2  # conv2: 3 in, 2 out
        + (2 * 10 - 1) * 2 + 2 + 2  # fc1: 10 in, 2 out
        + (2 * 2 - 1) * 3 + 3  # fc2
    )  # fmt: skip
    assert paper_flops(layers, units) == flops == 3204
    memory = (
        9 * 3 + 3 + 9 * 36  # conv1
        + 2 * 3  # bn1
        + 9 * 3 * 2 + 2 + 9 * 3 * 9  # conv2 with im2col
        + 10 * 2 + 2 + 2 * 3 + 3
    )  # fmt: skip
    assert paper_memory(layers, units) == memory == 690


def test_conv_to_flatten_to_dense_with_counts_takes_the_upper_bound() -> None:
    layers = small_layers()
    units = {"conv1": 3, "conv2": 3, "fc1": 16, "fc2": 2}
    costs = {c.name: c for c in layer_costs(layers, units)}
    assert costs["conv2"].out_units == min(3, 16)
    assert costs["fc1"].in_units == min(16, 3 * 9)
    # fc1 keeps more features than conv2's 2 channels can feed: 2 x 9 = 18 at most
    costs = {c.name: c for c in layer_costs(layers, {"conv2": 2, "fc1": 30})}
    assert costs["fc1"].in_units == 18
    assert costs["conv2"].out_units == 2
    # 3 features can need at most 3 of conv2's 5 kept channels
    costs = {c.name: c for c in layer_costs(layers, {"conv2": 5, "fc1": 3})}
    assert (costs["conv2"].out_units, costs["fc1"].in_units) == (3, 3)


def test_vgg_last_conv_and_first_dense_gate_the_same_512_units() -> None:
    """After the last max-pool the maps are 1x1: conv13's channels are fc1's features."""
    layers = network_layers("vgg_like")
    costs = {c.name: c for c in layer_costs(layers, {"features.conv13": 28, "classifier.fc1": 20})}
    assert costs["features.conv13"].out_units == 20
    assert costs["features.bn13"].out_units == costs["features.pool5"].out_units == 20
    assert costs["classifier.fc1"].in_units == 20


def test_dbb_overheads_on_dense_gates() -> None:
    layers = lenet300_layers()
    units = {"fc1": 300, "fc2": 100, "fc3": 50}
    active = {"fc1": 120.5, "fc2": 40.25, "fc3": 20.0}
    overhead = dict.fromkeys(active, paper_dbb_cost)
    flops = (
        5 * 300 + (2 * 120.5 - 1) * 100 + 100 + 100  # gate on 300 kept, fc1 reads 120.5
        + 5 * 100 + (2 * 40.25 - 1) * 50 + 50 + 50
        + 5 * 50 + (2 * 20 - 1) * 10 + 10
    )  # fmt: skip
    memory = 4 * 300 + 120.5 * 100 + 100 + 4 * 100 + 40.25 * 50 + 50 + 4 * 50 + 20 * 10 + 10
    assert paper_flops(layers, units, active, overhead=overhead) == flops == 30925
    assert paper_memory(layers, units, active, overhead=overhead) == memory == 16222.5
    kinds = [(c.name, c.kind) for c in layer_costs(layers, units, active, overhead=overhead)]
    assert kinds[:2] == [("fc1", "gate"), ("fc1", "linear")]


def test_dbb_overheads_on_conv_gates() -> None:
    layers = small_layers()
    units = {"conv1": 3}
    active = {"conv1": 2.5}
    overhead = {"conv1": paper_dbb_cost}
    flops = (
        (2 * 9 - 1) * 36 * 3 + 2 * 36 * 3  # conv1 computes its 3 kept channels
        + 2 * 6 * 6 * 3 + 4 * 3  # DBB gate: pooling and multiply over 6x6, mask construction
        + 4 * 2.5 * 9  # max-pool on the 2.5 active channels
        + (2 * 9 * 2.5 - 1) * 9 * 6 + 2 * 9 * 6  # conv2 reads 2.5 channels
        + (2 * 54 - 1) * 5 + 10 + (2 * 5 - 1) * 3 + 3
    )  # fmt: skip
    assert paper_flops(layers, units, active, overhead=overhead) == flops
    memory = (
        9 * 3 + 3 + 9 * 36 + 4 * 3  # conv1 and its DBB gate
        + 2 * 2.5  # bn1 after the gate
        + 9 * 2.5 * 6 + 6 + 9 * 2.5 * 9  # conv2
        + 54 * 5 + 5 + 5 * 3 + 3
    )  # fmt: skip
    assert paper_memory(layers, units, active, overhead=overhead) == memory
    kinds = [(c.name, c.kind) for c in layer_costs(layers, units, active, overhead=overhead)]
    assert kinds[:3] == [("conv1", "conv2d"), ("conv1", "gate"), ("bn1", "batchnorm")]


def test_active_defaults_to_all_kept_units() -> None:
    layers = lenet300_layers()
    overhead = {"fc2": paper_dbb_cost}
    with_gate = paper_flops(layers, {"fc2": 100}, {"fc2": 100}, overhead=overhead)
    assert with_gate == paper_flops(layers, {"fc2": 100}) + 5 * 100


def test_active_alone_changes_counts_but_adds_no_gate_cost() -> None:
    layers = lenet300_layers()
    costs = layer_costs(layers, {"fc2": 100}, {"fc2": 100})
    assert all(c.kind != "gate" for c in costs)
    assert paper_flops(layers, {"fc2": 100}, {"fc2": 100}) == paper_flops(layers, {"fc2": 100})
    # fewer active units than kept ones: fc2 reads 40, fc1 still computes the 100 kept
    costs = {c.name: c for c in layer_costs(layers, {"fc2": 100}, {"fc2": 40.0})}
    assert (costs["fc1"].out_units, costs["fc2"].in_units) == (100, 40.0)


def test_a_dbb_gates_runtime_cost_is_the_papers_formula() -> None:
    dbb = bbdrop.create_gate("dbb", 6)
    assert dbb.runtime_cost(300, None) == paper_dbb_cost(300, None) == (1500, 1200)
    assert dbb.runtime_cost(50, (8, 8)) == paper_dbb_cost(50, (8, 8)) == (6600, 200)
    layers = small_layers()
    units, active = {"conv2": 5, "fc1": 40}, {"conv2": 3.5, "fc1": 20.0}
    by_gate = layer_costs(layers, units, active, overhead={"conv2": dbb.runtime_cost,
                                                           "fc1": dbb.runtime_cost})  # fmt: skip
    by_formula = layer_costs(layers, units, active, overhead={"conv2": paper_dbb_cost,
                                                              "fc1": paper_dbb_cost})  # fmt: skip
    assert by_gate == by_formula
    gates = [(c.name, c.in_units, c.flops, c.memory) for c in by_gate if c.kind == "gate"]
    # conv2 computes min(5, 40) = 5 channels, fc1 keeps min(40, 5 x 9) = 40 features
    assert gates == [("conv2", 5, 2 * 3 * 3 * 5 + 4 * 5, 4 * 5), ("fc1", 40, 5 * 40, 4 * 40)]


def test_static_gates_cost_nothing() -> None:
    net = bbdrop.attach_gates_(create_model("lenet5_caffe"), "bb")
    with torch.no_grad():
        net.conv2.gate.a_raw[:20] = -10.0
    costs = paper_costs(net, torch.zeros(1, 1, 28, 28))
    assert all(c.kind != "gate" for c in costs.layers)
    assert costs.flops == paper_flops(network_layers("lenet5_caffe"), {"conv2": 30})
    free = layer_costs(lenet300_layers(), {"fc2": 100}, overhead={"fc2": lambda k, hw: (0, 0)})
    assert [c.kind for c in free] == ["linear"] * 3


def test_gate_costs_sit_by_their_layers_and_count_its_kept_units() -> None:
    """An input gate's cost comes before its layer, an output gate's after; each is
    counted over the units its layer computes or reads (before run-time pruning)."""
    layers = small_layers()
    seen: dict[str, tuple] = {}

    def recorder(name: str):
        def cost(k: float, spatial: tuple[int, int] | None) -> tuple[float, float]:
            seen[name] = (k, spatial)
            return 1.0, 0.0

        return cost

    conv2 = torch.tensor([True, True, True, False, False, False])
    fc1 = torch.zeros(54, dtype=torch.bool)
    fc1[0:10] = True  # channel 0, and one feature of channel 1
    fc1[27:36] = True  # channel 3, which conv2's gate prunes
    overhead = {name: recorder(name) for name in ("conv1", "conv2", "fc1", "fc2")}
    costs = layer_costs(layers, {"conv2": conv2, "fc1": fc1}, overhead=overhead)
    assert [(c.name, c.kind) for c in costs] == [
        ("conv1", "conv2d"), ("conv1", "gate"), ("bn1", "batchnorm"), ("pool", "maxpool"),
        ("conv2", "conv2d"), ("conv2", "gate"), ("fc1", "gate"), ("fc1", "linear"),
        ("fc2", "gate"), ("fc2", "linear"),
    ]  # fmt: skip
    assert seen == {"conv1": (4, (6, 6)), "conv2": (2, (3, 3)), "fc1": (10, None),
                    "fc2": (5, None)}  # fmt: skip
    layer_costs(layers, {"conv2": conv2, "fc1": fc1}, overhead=overhead, rule="authors")
    assert (seen["conv2"], seen["fc1"]) == ((3, (3, 3)), (19, None))


def test_bad_overheads_and_rules_are_rejected() -> None:
    layers = lenet300_layers()
    with pytest.raises(ValueError, match=r"overhead names 'fc4'.*available: fc1, fc2, fc3"):
        paper_flops(layers, overhead={"fc4": paper_dbb_cost})
    with pytest.raises(ValueError, match=r"overhead\['fc1'\] must be a function"):
        paper_flops(layers, overhead={"fc1": 5.0})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"overhead\['fc1'\] must return \(flops, memory\)"):
        paper_flops(layers, overhead={"fc1": lambda k, hw: 5 * k})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"overhead\['fc1'\] must return finite numbers >= 0"):
        paper_flops(layers, overhead={"fc1": lambda k, hw: (-1.0, 0.0)})
    with pytest.raises(ValueError, match=r"rule must be one of 'masks', 'authors'"):
        paper_flops(layers, rule="paper")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule must be one of"):
        paper_costs(create_model("lenet_500_300"), torch.zeros(1, 784), rule="x")  # type: ignore[arg-type]


# -- validation --------------------------------------------------------------------
def test_unknown_layer_names_list_the_gateable_ones() -> None:
    with pytest.raises(ValueError, match=r"'fc4'.*available: fc1, fc2, fc3"):
        paper_flops(lenet300_layers(), {"fc4": 3})
    with pytest.raises(ValueError, match="active names 'bn1'"):
        paper_flops(small_layers(), active={"bn1": 1.0})


@pytest.mark.parametrize(
    ("units", "message"),
    [
        ({"fc2": 501}, r"must be <= 500"),
        ({"fc2": -1}, r"finite number >= 0"),
        ({"fc2": torch.ones(500)}, r"boolean mask of shape \(500,\)"),
        ({"fc2": torch.ones(499, dtype=torch.bool)}, r"boolean mask of shape \(500,\)"),
    ],
)
def test_bad_units_are_rejected(units: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paper_flops(lenet300_layers(), units)


def test_active_above_the_gate_size_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"active\['fc3'\] must be <= 300"):
        paper_flops(lenet300_layers(), active={"fc3": 300.5})


def test_non_sequential_networks_are_refused() -> None:
    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(10, 6), nn.Linear(10, 4)

        def forward(self, x: Tensor) -> Tensor:
            return torch.cat([self.a(x), self.b(x)], 1)

    layers = trace_layers(TwoBranches(), torch.zeros(1, 10))
    with pytest.raises(ValueError, match=r"'b'.*sequential networks"):
        paper_flops(layers)

    class DenseToConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.conv = nn.Linear(4, 8), nn.Conv2d(2, 3, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(self.fc(x).view(-1, 2, 2, 2))

    with pytest.raises(ValueError, match="cannot take 8 channels"):
        paper_flops(trace_layers(DenseToConv(), torch.zeros(1, 4)))


# -- the paper's own figures -------------------------------------------------------
# (Table 1 / Fig. 1: units per gated layer, reported speedup, reported memory %.)
# The memory column matches without the im2col buffers (see bbdrop.metrics.paper).
# Tolerances: the paper reports medians of five runs for units and figures separately.
PAPER_ROWS = [
    ("vgg_like", 10, "51-64-126-125-229-116-44-38-24-13-16-10-28-28-75", 2.56, 5.5),
    ("vgg_like", 100, "36-59-103-121-211-142-87-50-19-18-13-10-47-47-150", 3.04, 5.8),
    ("vgg_like", 10, "64-64-128-128-254-218-58-107-91-14-152-79-107-109-473", 2.00, 10.5),
    ("lenet5_caffe", 10, "13-15-100-50", 4.5, 2.4),
    ("lenet_500_300", 10, "219-102-40", 20.5, 4.87),
]


@pytest.mark.parametrize("rule", ["masks", "authors"])
@pytest.mark.parametrize(("name", "num_classes", "units", "reported", "memory"), PAPER_ROWS)
def test_paper_figures_are_reproduced_from_its_unit_counts(
    name: str, num_classes: int, units: str, reported: float, memory: float, rule: str
) -> None:
    layers = network_layers(name, num_classes)
    names = [r.name for r in layers if r.gate_side is not None]
    kept = dict(zip(names, map(int, units.split("-")), strict=True))
    assert speedup(layers, kept, rule=rule) == pytest.approx(reported, rel=0.02)
    fraction = memory_fraction(layers, kept, rule=rule, im2col=False)
    assert 100 * fraction == pytest.approx(memory, rel=0.05)


def test_the_papers_memory_column_cannot_include_im2col() -> None:
    """LeNet5-Caffe's conv1 im2col buffer alone exceeds SBP's reported 2.4% of the total."""
    layers = network_layers("lenet5_caffe")
    conv1_buffer = 5 * 5 * 1 * 24 * 24
    assert 100 * conv1_buffer / paper_memory(layers) > 2.4 + 0.5
    kept = {"conv1": 13, "conv2": 15, "fc1": 100, "fc2": 50}
    assert 100 * memory_fraction(layers, kept) > 2 * 2.4


def test_dbb_model_end_to_end_with_its_active_units() -> None:
    """Names and counts from :func:`bbdrop.active_units` plug into the accounting."""
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(create_model("lenet5_caffe"), "dbb").eval()
    with torch.no_grad():
        for _, g in bbdrop.gated_layers(net):
            g.gate.shift.fill_(10.0)  # phi clamps to 1: every kept unit is active
    net(torch.rand(3, 1, 28, 28))
    active = bbdrop.active_units(net)
    assert active == {"conv1": 20.0, "conv2": 50.0, "fc1": 800.0, "fc2": 500.0}
    costs = paper_costs(net, torch.zeros(1, 1, 28, 28), active=active)
    overhead = (
        2 * 24 * 24 * 20 + 4 * 20  # conv1's gate over its 24x24 maps
        + 2 * 8 * 8 * 50 + 4 * 50  # conv2's
        + 5 * 800 + 5 * 500  # the dense inputs'
    )  # fmt: skip
    assert costs.flops == costs.full_flops + overhead
    assert costs.memory == costs.full_memory + 4 * (20 + 50 + 800 + 500)
    assert costs.speedup < 1.0
    assert [c.name for c in costs.layers if c.kind == "gate"] == ["conv1", "conv2", "fc1", "fc2"]
    # The gates' own cost does not depend on active: paper_costs asks the gates for it.
    assert paper_costs(net, torch.zeros(1, 1, 28, 28)).flops == costs.full_flops + overhead
