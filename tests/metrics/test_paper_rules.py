"""The two counting rules ("masks", "authors") and :func:`paper_figures`, against hand
arithmetic written out here."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import bbdrop
from bbdrop.metrics import (
    layer_costs,
    paper_costs,
    paper_figures,
    paper_flops,
    paper_memory,
    trace_layers,
)

LENET5_INPUT = torch.zeros(1, 1, 28, 28)


def lenet5_layers() -> list:
    return trace_layers(bbdrop.create_model("lenet5_caffe"), LENET5_INPUT)


def lenet5_flops(c1: float, c2_in: float, c2_out: float, pool2: float, f1: float, f2: float):
    """LeNet5-Caffe by the module docstring's formulas: conv1 1->c1 5x5 on 28x28 -> 24x24,
    pool 2 -> 12x12, conv2 c2_in->c2_out 5x5 -> 8x8, pool on ``pool2`` maps -> 4x4,
    dense f1 -> f2, dense f2 -> 10 (logits: no activation)."""
    return (
        (2 * 5 * 5 * 1 - 1) * 24 * 24 * c1 + 24 * 24 * c1 + 24 * 24 * c1  # conv1, bias, ReLU
        + 2 * 2 * 12 * 12 * c1  # pool1
        + (2 * 5 * 5 * c2_in - 1) * 8 * 8 * c2_out + 2 * 8 * 8 * c2_out  # conv2
        + 2 * 2 * 4 * 4 * pool2  # pool2
        + (2 * f1 - 1) * f2 + f2 + f2  # fc1
        + (2 * f2 - 1) * 10 + 10  # fc2
    )  # fmt: skip


def lenet5_memory(c1: float, c2_in: float, c2_out: float, f1: float, f2: float, im2col: bool):
    return (
        25 * 1 * c1 + c1 + im2col * 25 * 1 * 24 * 24  # conv1: weights, bias, im2col
        + 25 * c2_in * c2_out + c2_out + im2col * 25 * c2_in * 8 * 8  # conv2
        + f1 * f2 + f2  # fc1
        + f2 * 10 + 10  # fc2
    )  # fmt: skip


def first(n: int, size: int) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[:n] = True
    return mask


def differing_masks() -> dict[str, Tensor]:
    """conv2 keeps channels 0-29; fc1 keeps the 500 features 20-519 (feature f lies in
    channel f // 16): 12 of channel 1, all of channels 2-31, 8 of channel 32. Channel 0
    has no feature left, and 20 + 16 + 8 = 44 kept features lie in pruned channels."""
    fc1 = torch.zeros(800, dtype=torch.bool)
    fc1[20:520] = True
    return {"conv1": first(15, 20), "conv2": first(30, 50), "fc1": fc1, "fc2": first(200, 500)}


def test_the_rules_differ_at_lenet5s_flatten_boundary() -> None:
    layers = lenet5_layers()
    units = differing_masks()
    # authors: each gate's own count: 15 - 30 - 500 - 200
    authors = {c.name: c for c in layer_costs(layers, units, rule="authors")}
    assert (authors["conv2"].out_units, authors["pool2"].out_units) == (30, 30)
    assert (authors["fc1"].in_units, authors["fc1"].out_units) == (500, 200)
    expected = lenet5_flops(15, 15, 30, 30, 500, 200)
    assert expected == 2_097_320
    assert paper_flops(layers, units, rule="authors") == expected
    for im2col in (True, False):
        memory = lenet5_memory(15, 15, 30, 500, 200, im2col)
        assert paper_memory(layers, units, rule="authors", im2col=im2col) == memory
    # masks: channels 1-29 computed (channel 0 feeds no kept feature); fc1 reads the
    # 12 + 28 x 16 = 460 kept features of channels 1-29
    masks = {c.name: c for c in layer_costs(layers, units)}
    assert (masks["conv2"].out_units, masks["fc1"].in_units) == (29, 460)
    assert paper_flops(layers, units) == lenet5_flops(15, 15, 29, 29, 460, 200) == 2_033_192
    # the same counts give the authors' figures whatever the masks are
    counts = {"conv1": 15, "conv2": 30, "fc1": 500, "fc2": 200}
    assert paper_flops(layers, counts, rule="authors") == expected
    # ...but the keep-mask rule's upper bound: min(30, 500) channels, min(500, 480) features
    assert paper_flops(layers, counts) == lenet5_flops(15, 15, 30, 30, 480, 200)


def test_the_rules_agree_when_the_dense_survivors_lie_in_surviving_channels() -> None:
    layers = lenet5_layers()
    fc1 = torch.zeros(800, dtype=torch.bool)
    for channel in range(30):  # 10 features of each of conv2's 30 surviving channels
        fc1[16 * channel : 16 * channel + 10] = True
    units = {"conv1": first(15, 20), "conv2": first(30, 50), "fc1": fc1, "fc2": first(200, 500)}
    expected = lenet5_flops(15, 15, 30, 30, 300, 200)
    assert paper_flops(layers, units) == paper_flops(layers, units, rule="authors") == expected
    assert layer_costs(layers, units) == layer_costs(layers, units, rule="authors")


def test_dbb_active_counts_under_the_authors_rule() -> None:
    """Each gated layer reads its own gate's active count; the gates cost over their
    kept units either way."""
    layers = lenet5_layers()
    units = {"conv2": 30, "fc1": 500}
    active = {"conv2": 20.5, "fc1": 400.0}

    def dbb(k: float, spatial: tuple[int, int] | None) -> tuple[float, float]:
        return (5 * k if spatial is None else 2 * spatial[0] * spatial[1] * k + 4 * k), 4 * k

    overhead = {"conv2": dbb, "fc1": dbb}
    gates = 2 * 8 * 8 * 30 + 4 * 30 + 5 * 500  # conv2's gate over 30, fc1's over 500
    authors = paper_flops(layers, units, active, overhead=overhead, rule="authors")
    assert authors == lenet5_flops(20, 20, 30, 20.5, 400.0, 500) + gates
    # keep masks: fc1's gate can only see what 20.5 active channels feed: 20.5 x 16 = 328
    masks = paper_flops(layers, units, active, overhead=overhead)
    assert masks == lenet5_flops(20, 20, 30, 20.5, 328.0, 500) + 2 * 8 * 8 * 30 + 4 * 30 + 5 * 480


# -- paper_figures -------------------------------------------------------------------
FIGURE_KEYS = {
    "speedup", "speedup_authors", "memory", "memory_authors",
    "memory_params", "memory_params_authors", "flops", "flops_dense",
}  # fmt: skip


def pruned_lenet300() -> torch.nn.Module:
    net = bbdrop.attach_gates_(bbdrop.create_model("lenet_500_300"), "bb")
    with torch.no_grad():  # E[pi] < 1e-3: pruned
        net.fc1.gate.a_raw[::3] = -10.0
        net.fc2.gate.a_raw[:380] = -10.0
        net.fc3.gate.a_raw[100:] = -10.0
    assert bbdrop.units_kept(net) == {"fc1": 522, "fc2": 120, "fc3": 100}
    return net


def test_paper_figures_of_a_pruned_mlp() -> None:
    net, x = pruned_lenet300(), torch.zeros(1, 784)
    figures = paper_figures(net, x)
    assert set(figures) == FIGURE_KEYS
    assert all(isinstance(v, float) for v in figures.values())
    for suffix, rule in (("", "masks"), ("_authors", "authors")):
        costs = paper_costs(net, x, rule=rule)
        params = paper_costs(net, x, rule=rule, im2col=False)
        assert figures["speedup" + suffix] == costs.speedup
        assert figures["memory" + suffix] == costs.memory_fraction
        assert figures["memory_params" + suffix] == params.memory_fraction
    costs = paper_costs(net, x)
    assert (figures["flops"], figures["flops_dense"]) == (costs.flops, costs.full_flops)
    flops = (2 * 522 - 1) * 120 + 2 * 120 + (2 * 120 - 1) * 100 + 2 * 100 + (2 * 100 - 1) * 10 + 10
    assert figures["flops"] == flops
    assert figures["flops_dense"] == 1_090_800
    assert figures["speedup"] == pytest.approx(1_090_800 / flops, rel=1e-12)
    memory = 522 * 120 + 120 + 120 * 100 + 100 + 100 * 10 + 10
    assert figures["memory_params"] == pytest.approx(memory / 545_810, rel=1e-12)


def test_on_an_mlp_the_two_rules_agree_exactly() -> None:
    """No flatten boundary: one gate fixes each boundary, so the rules cannot differ."""
    figures = paper_figures(pruned_lenet300(), torch.zeros(1, 784))
    for key in ("speedup", "memory", "memory_params"):
        assert figures[key] == figures[key + "_authors"]
    # no conv: the im2col buffer changes nothing
    assert figures["memory"] == figures["memory_params"]


def test_paper_figures_of_lenet5_under_both_rules() -> None:
    net = bbdrop.attach_gates_(bbdrop.create_model("lenet5_caffe"), "bb")
    units = differing_masks()
    with torch.no_grad():
        for name, g in bbdrop.gated_layers(net):
            g.gate.a_raw[~units[name]] = -10.0
    figures = paper_figures(net, LENET5_INPUT)
    dense = lenet5_flops(20, 20, 50, 50, 800, 500)
    assert figures["flops_dense"] == dense == 4_615_940
    assert figures["flops"] == lenet5_flops(15, 15, 29, 29, 460, 200)
    assert figures["speedup"] == pytest.approx(dense / figures["flops"], rel=1e-12)
    assert figures["speedup_authors"] == pytest.approx(
        dense / lenet5_flops(15, 15, 30, 30, 500, 200), rel=1e-12
    )
    for key, im2col in (("memory", True), ("memory_params", False)):
        full = lenet5_memory(20, 20, 50, 800, 500, im2col)
        masks = lenet5_memory(15, 15, 29, 460, 200, im2col)
        authors = lenet5_memory(15, 15, 30, 500, 200, im2col)
        assert figures[key] == pytest.approx(masks / full, rel=1e-12)
        assert figures[key + "_authors"] == pytest.approx(authors / full, rel=1e-12)


def test_paper_figures_of_a_dbb_model_count_its_gates_and_active_units() -> None:
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(bbdrop.create_model("lenet5_caffe"), "dbb").eval()
    with torch.no_grad():
        for _, g in bbdrop.gated_layers(net):
            g.gate.shift.fill_(10.0)  # phi clamps to 1: every kept unit is active
    net(torch.rand(3, 1, 28, 28))
    active = bbdrop.active_units(net)
    figures = paper_figures(net, LENET5_INPUT, active)
    overhead = 2 * 24 * 24 * 20 + 4 * 20 + 2 * 8 * 8 * 50 + 4 * 50 + 5 * 800 + 5 * 500
    assert figures["flops"] == figures["flops_dense"] + overhead
    assert figures["speedup"] == figures["speedup_authors"] < 1.0
    params = lenet5_memory(20, 20, 50, 800, 500, im2col=False)
    assert figures["memory_params"] == pytest.approx(
        (params + 4 * (20 + 50 + 800 + 500)) / params, rel=1e-12
    )
