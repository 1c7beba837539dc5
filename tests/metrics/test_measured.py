"""Measured parameters and executed FLOPs (torch.utils.flop_counter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.metrics import count_parameters, measure, measured_flops
from bbdrop.models import create_model


@pytest.mark.parametrize(("n_in", "n_out", "batch"), [(7, 5, 3), (784, 500, 1), (3, 1, 10)])
def test_linear_flops_are_two_in_out_per_example(n_in: int, n_out: int, batch: int) -> None:
    flops = measured_flops(nn.Linear(n_in, n_out), torch.zeros(batch, n_in))
    assert flops == 2 * n_in * n_out * batch


def test_conv_flops_are_two_k_k_in_out_per_output_position() -> None:
    flops = measured_flops(nn.Conv2d(2, 4, 3), torch.zeros(2, 2, 6, 6))
    assert flops == 2 * (3 * 3 * 2) * 4 * (4 * 4) * 2


def test_lenet_500_300_counts_matmuls_only() -> None:
    flops = measured_flops(create_model("lenet_500_300"), torch.zeros(1, 784))
    assert flops == 2 * (784 * 500 + 500 * 300 + 300 * 10)  # no bias, no ReLU


def test_gates_add_no_measured_flops() -> None:
    x = torch.zeros(1, 1, 28, 28)
    dense = measured_flops(create_model("lenet5_caffe"), x)
    gated = measured_flops(bbdrop.attach_gates_(create_model("lenet5_caffe"), "dbb"), x)
    assert gated == dense == 2 * (25 * 20 * 576 + 25 * 20 * 50 * 64 + 800 * 500 + 500 * 10)


def test_parameter_counts_with_and_without_gates() -> None:
    net = bbdrop.attach_gates_(create_model("lenet_500_300"), "bb")
    weights = 784 * 500 + 500 + 500 * 300 + 300 + 300 * 10 + 10
    gate_params = 2 * (784 + 500 + 300)  # a_raw, b_raw per unit
    assert count_parameters(net, include_gates=False) == weights
    assert count_parameters(net) == weights + gate_params
    result = measure(net, torch.zeros(1, 784), include_gates=False)
    assert (result.parameters, result.flops) == (weights, 2 * (784 * 500 + 500 * 300 + 3000))


def test_measuring_leaves_dbb_counters_and_modes_alone() -> None:
    net = bbdrop.attach_gates_(create_model("lenet_500_300"), "dbb").eval()
    net(torch.rand(5, 784))
    counters = bbdrop.active_units(net)
    net.train()
    measured_flops(net, torch.rand(3, 784))
    assert bbdrop.active_units(net) == counters
    assert [int(g.gate.examples_seen) for _, g in bbdrop.gated_layers(net)] == [5] * 3
    assert all(m.training for m in net.modules())


def test_latencies_interleave_rounds_over_every_input_in_eval_mode() -> None:
    """The mechanics, not the speed (timed tests flake): every model sees every input
    ``warmup + rounds * calls`` times, in eval mode, and gets a positive time per pass."""
    from bbdrop.metrics import latencies

    seen: dict[str, list[tuple[int, bool]]] = {"a": [], "b": []}

    class Counting(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen[self.name].append((int(x[0, 0]), self.training))
            return x

    xs = [torch.full((1, 2), float(i)) for i in range(4)]
    times = latencies({"a": Counting("a"), "b": Counting("b")}, xs, rounds=3, calls=2, warmup=1)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    for calls in seen.values():
        assert calls == [(i, False) for _ in range(1 + 3 * 2) for i in range(4)]
