"""Tracing layer shapes for the accounting: names, shapes, activations, no side effects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbdrop
from bbdrop import gate_layer_
from bbdrop.gates import Gate
from bbdrop.metrics import LayerRecord, trace_layers
from bbdrop.models import create_model


def test_lenet5_caffe_records() -> None:
    layers = trace_layers(create_model("lenet5_caffe"), torch.zeros(2, 1, 28, 28))
    assert layers == [
        LayerRecord("conv1", "conv2d", (1, 28, 28), (20, 24, 24), (5, 5), True, True, "output"),
        LayerRecord("pool1", "maxpool", (20, 24, 24), (20, 12, 12), (2, 2)),
        LayerRecord("conv2", "conv2d", (20, 12, 12), (50, 8, 8), (5, 5), True, True, "output"),
        LayerRecord("pool2", "maxpool", (50, 8, 8), (50, 4, 4), (2, 2)),
        LayerRecord("fc1", "linear", (800,), (500,), bias=True, activation=True, gate_side="input"),
        LayerRecord("fc2", "linear", (500,), (10,), bias=True, activation=False, gate_side="input"),
    ]
    assert [r.num_gate_units for r in layers] == [20, None, 50, None, 800, 500]


class BatchNormNet(nn.Module):
    """conv, BN2d, ReLU, max-pool, flatten, dense, BN1d, ReLU, dense, nested like VGG."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@pytest.mark.parametrize("gate", ["bb", "dbb"])
def test_gated_models_trace_like_plain_ones(gate: str) -> None:
    x = torch.zeros(1, 3, 4, 4)
    torch.manual_seed(0)
    plain = trace_layers(BatchNormNet(), x)
    torch.manual_seed(0)
    gated_net = bbdrop.attach_gates_(BatchNormNet(), gate)
    gated = trace_layers(gated_net, x)
    assert gated == plain
    assert [(r.name, r.kind, r.out_shape) for r in gated] == [
        ("features.0", "conv2d", (4, 4, 4)),
        ("features.1", "batchnorm", (4, 4, 4)),
        ("features.3", "maxpool", (4, 2, 2)),
        ("classifier.1", "linear", (8,)),
        ("classifier.2", "batchnorm", (8,)),
        ("classifier.4", "linear", (2,)),
    ]
    assert [r.name for r in gated if r.gate_side] == [n for n, _ in bbdrop.gated_layers(gated_net)]


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(4, 4) for _ in range(4))
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(x))
        x = torch.sigmoid(self.bn(self.fc2(x)))  # batch norm in between
        x = self.fc3(x)  # no activation
        return self.fc4(x).tanh()


def test_functional_activations_are_seen() -> None:
    """An activation counts for the latest linear/conv layer, across batch norm."""
    layers = trace_layers(FunctionalNet(), torch.zeros(1, 4))
    assert [(r.name, r.activation) for r in layers] == [
        ("fc1", True),
        ("fc2", True),
        ("bn", False),
        ("fc3", False),
        ("fc4", True),
    ]


class SigmoidGate(Gate):
    """A gate that calls an activation function internally (not the network's)."""

    def mask(self, x: Tensor) -> Tensor:
        return torch.sigmoid(torch.zeros(self.num_units))

    def regularizer(self, layer: nn.Module) -> Tensor:
        return torch.zeros(())

    def gate_values(self) -> Tensor:
        return torch.full((self.num_units,), 0.5)


def test_functions_inside_gates_are_not_activations() -> None:
    net = nn.Sequential(nn.Linear(3, 4), gate_layer_(nn.Linear(4, 2), SigmoidGate(4), "input"))
    layers = trace_layers(net, torch.zeros(1, 3))
    assert [(r.name, r.activation) for r in layers] == [("0", False), ("1", False)]
    net_act = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    assert trace_layers(net_act, torch.zeros(1, 3))[0].activation is True


def test_tracing_leaves_no_trace() -> None:
    """Modes, batch-norm statistics and DBB active-unit counters are as they were."""
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(create_model("lenet5_caffe"), "dbb").eval()
    net(torch.randn(4, 1, 28, 28))  # DBB counters now hold 4 examples
    net.train()
    buffers = [b.clone() for b in net.buffers()]
    trace_layers(net, torch.randn(2, 1, 28, 28))
    assert all(m.training for m in net.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers(), strict=True))
    assert [int(g.gate.examples_seen) for _, g in bbdrop.gated_layers(net)] == [4] * 4
    assert torch.is_grad_enabled()


def test_untraceable_uses_are_refused() -> None:
    with pytest.raises(ValueError, match=r"no nn\.Linear or nn\.Conv2d"):
        trace_layers(nn.Sequential(nn.ReLU()), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"shape \(N, features\)"):
        trace_layers(nn.Linear(3, 2), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="groups=2"):
        trace_layers(nn.Conv2d(2, 2, 1, groups=2), torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="batched tensor"):
        trace_layers(nn.Linear(3, 2), torch.zeros(3))


def test_hooks_are_removed() -> None:
    net = create_model("lenet5_caffe")
    trace_layers(net, torch.zeros(1, 1, 28, 28))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
