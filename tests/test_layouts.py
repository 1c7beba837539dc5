"""Gates on every layout, without changing the user's module tree: a ``Linear`` gated on
the last dimension of (N, ..., K), convolutions of any dimension on their channels,
DBB pooling over every dimension but the batch and the units, and PyTorch's own
transformer block trained and evaluated with gates (batch first or not)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.gates.base import Gate

METHODS = ["bb", "dbb", "svd", "ssl", "sbp", "l0", "vib"]


class Encoder(nn.Module):
    """PyTorch's transformer block as a user would classify token sequences with it."""

    def __init__(self, batch_first: bool = True, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.block = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, d)
        h = self.block(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


def trained_like(gate: Gate) -> Gate:
    """``gate`` with its parameters moved off their initial values (seeded), as after
    training: the checks below then see a mask that is not the same for every unit."""
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return gate


def test_attaching_keeps_the_module_tree_types_attributes_and_keys() -> None:
    net = Encoder()
    keys = set(net.state_dict())
    linear1, weight = net.block.linear1, net.block.linear1.weight
    bbdrop.attach_gates_(net, "bb")
    assert net.block.linear1 is linear1 and type(linear1) is nn.Linear
    assert linear1.weight is weight  # user code that reads the weight sees the same one
    added = set(net.state_dict()) - keys
    assert keys <= set(net.state_dict()) and added
    assert all(".gate." in k for k in added)
    assert [n for n, _ in bbdrop.gated_layers(net)] == ["block.linear1", "block.linear2", "head"]
    # taking the gates off gives the plain network back, keys and all
    assert set(bbdrop.compaction.without_gates(net).state_dict()) == keys


def test_a_linear_gate_acts_on_the_last_dimension() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    gate = trained_like(bbdrop.create_gate("bb", 4)).eval()
    x = torch.randn(2, 5, 4)  # (N, T, K)
    expected = layer(x * gate.gate_values())  # by broadcasting, on the features
    bbdrop.gate_layer_(layer, gate, "input")
    torch.testing.assert_close(layer.eval()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("conv", [nn.Conv1d(2, 4, 3), nn.Conv3d(2, 4, 3)], ids=["1d", "3d"])
def test_convolutions_of_any_dimension_are_gated_on_their_channels(conv: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 2, *[5] * (conv.weight.dim() - 2))
    plain = conv(x)
    net = bbdrop.attach_gates_(nn.Sequential(conv), "bb")
    gate = trained_like(conv.gate)
    shape = (1, 4, *[1] * (x.dim() - 2))
    torch.testing.assert_close(net.eval()(x), plain * gate.gate_values().reshape(shape))


def test_dbb_pools_over_the_tokens_and_masks_each_sequence() -> None:
    """DBB on a Linear that reads (N, T, K): its input-dependent mask comes from each
    sequence's average over its tokens, and multiplies every token of it."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 2)
    bbdrop.gate_layer_(layer, bbdrop.create_gate("dbb", 6), "input")
    x = torch.randn(8, 5, 6)
    layer.train()(x)  # running statistics
    layer.eval()
    gate = layer.gate
    pooled = x.mean(1)  # (N, K): the average over tokens, by hand
    m = gate.gate_values() * gate.phi(pooled)
    m = torch.where(m > gate.threshold, m, torch.zeros(()))
    torch.testing.assert_close(layer(x), layer.forward(x * m[:, None, :]))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_evaluates_pytorchs_transformer_block(
    method: str, batch_first: bool
) -> None:
    """Training steps stay finite and reach the gates; in evaluation each sequence's
    output does not depend on the others in its batch (the gates found the batch
    dimension, which is 1 inside a block with batch_first=False)."""
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(Encoder(batch_first), "bb" if method == "dbb" else method)
    if method == "dbb":
        bbdrop.convert_gates_(net, "dbb")
    x, y = torch.randn(16, 5, 16), torch.randint(0, 3, (16,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        loss = nn.functional.cross_entropy(net(x), y) + bbdrop.total_kl(net) / 1000
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    batch = 0 if batch_first else 1
    assert net.block.linear2.gate.layout == (batch, -1)
    grads = [p.grad for _, g in bbdrop.gated_layers(net) for p in g.gate.parameters()]
    if grads:  # SSL has no gate parameters: its penalty is on the weights
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    net.eval()
    with torch.no_grad():
        whole = net(x)
        alone = torch.cat([net(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(whole[:4], alone, rtol=1e-5, atol=1e-5)


def test_a_layer_with_a_gate_attribute_of_its_own_is_refused_untouched() -> None:
    class Gated(nn.Linear):
        gate = "mine"

    layer = Gated(3, 2)
    with pytest.raises(ValueError, match="attribute 'gate' of its own"):
        bbdrop.gate_layer_(layer, bbdrop.create_gate("bb", 3), "input")
    assert layer.gate == "mine" and not layer._forward_pre_hooks


def test_a_copy_of_a_gated_network_uses_its_own_gates() -> None:
    """The hooks look the gate up on the layer they run on, so a deep copy (or a
    pickled and loaded network) computes with its own gates."""
    import copy

    torch.manual_seed(0)
    net = bbdrop.attach_gates_(nn.Sequential(nn.Linear(4, 3)), "bb").eval()
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin[0].gate.a_raw.fill_(-5.0)  # E[pi] near 0 in the copy only
    x = torch.randn(2, 4)
    assert not torch.allclose(net(x), twin(x))
    torch.testing.assert_close(net(x), copy.deepcopy(net)(x), rtol=0, atol=0)
