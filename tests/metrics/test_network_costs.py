"""Costs of any network (bbdrop.network_costs), against counts by hand: the FLOPs of
the compacted network's layers from their widths, and DBB's expected cost from the
masks each example switches on (bbdrop.collect_masks)."""

from __future__ import annotations

import torch
from torch import nn

import bbdrop


def mlp_with_gates(method: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(),
                        nn.Linear(16, 3))  # fmt: skip
    x = torch.randn(64, 12)
    bbdrop.attach_gates_(net, "bb", example=x[:8])  # the two hidden groups
    with torch.no_grad():
        net[0].gate.a_raw[:5], net[0].gate.b_raw[:5] = -20.0, 20.0  # 15 of 20 kept
        net[2].gate.a_raw[:4], net[2].gate.b_raw[:4] = -20.0, 20.0  # 12 of 16 kept
    if method == "dbb":
        bbdrop.convert_gates_(net, "dbb")
        net.train()
        net(x)  # running statistics
        with torch.no_grad():
            net[2].gate.shift.fill_(-0.2)  # phi < 1: some units off for some inputs
    return net.eval(), x


def test_a_static_network_costs_what_its_kept_widths_compute() -> None:
    net, x = mlp_with_gates("bb")
    costs = bbdrop.network_costs(net, x)
    assert costs.dense_flops == 2 * (12 * 20 + 20 * 16 + 16 * 3)
    assert costs.flops == 2 * (12 * 15 + 15 * 12 + 12 * 3)
    assert costs.expected_flops == costs.flops
    assert costs.parameters == (12 * 15 + 15) + (15 * 12 + 12) + (12 * 3 + 3)
    assert [(g.name, g.units, g.active) for g in costs.groups] == [("0", 15, None),
                                                                  ("2", 12, None)]  # fmt: skip
    # the layers that read a group: the next linear layer
    assert [g.reader_flops for g in costs.groups] == [2 * 15 * 12, 2 * 12 * 3]


def test_dbb_expected_cost_scales_the_readers_by_the_units_each_example_switches_on() -> None:
    net, x = mlp_with_gates("dbb")
    masks = bbdrop.collect_masks(net, x)
    on = float((masks["2"] != 0).sum(1).float().mean())  # units on per example, by hand
    assert 0 < on < 12
    costs = bbdrop.network_costs(net, x)
    group = dict((g.name, g) for g in costs.groups)["2"]
    assert abs(group.active - on) < 1e-9
    torch.testing.assert_close(group.expected_flops, 2 * 3 * on)
    assert costs.expected_flops < costs.flops
    torch.testing.assert_close(costs.expected_flops, costs.flops - 2 * 3 * (12 - on)
                               - (group_off("0", costs, masks)))  # fmt: skip


def group_off(name: str, costs: object, masks: dict[str, torch.Tensor]) -> float:
    """The FLOPs the readers of group ``name`` skip, from its masks."""
    group = dict((g.name, g) for g in costs.groups)[name]
    on = float((masks[name] != 0).sum(1).float().mean())
    return group.reader_flops * (1 - on / group.units)


def test_the_transformer_blocks_fused_kernel_is_counted_unfused() -> None:
    """PyTorch's fused encoder kernel (its eval fast path) has no FLOP formula: the count
    runs the block unfused. Its attention products run in a kernel that FlopCounterMode
    does not count on the CPU either. The heads' gate is on out_proj's input: out_proj,
    applied inside the attention's fused call, reads them."""
    block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    x = torch.randn(4, 5, 8)
    bbdrop.attach_gates_(block, "bb", example=x)
    costs = bbdrop.network_costs(block.eval(), x)
    t, d, h = 5, 8, 16  # per example: the q, k, v and output projections, then the MLP
    assert costs.dense_flops == 2 * t * d * 3 * d + 2 * t * d * d + 2 * t * (d * h + h * d)
    groups = {g.name: g for g in costs.groups}
    assert groups["linear1"].reader_flops == 2 * t * h * d  # linear2 reads the hidden units
    assert groups["self_attn.out_proj"].reader_flops == 2 * t * d * d
