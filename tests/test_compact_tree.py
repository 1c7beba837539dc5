"""The compacted network keeps the user's module tree: every layer that survives keeps
its type and its qualified name, and what runs beside it (a gather, a DBB mask) is its
child, applied by hooks, as gates are; PyTorch's transformer fast path runs where
nothing runs beside the block's layers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from networks import Encoder
from torch import nn

import bbdrop
from bbdrop.compaction import (
    Beside,
    DependentMask,
    SelectFeatures,
    attach_beside_,
    beside,
    detach_beside_,
    without_gates,
)
from bbdrop.models import create_model

pytest.importorskip("torch_pruning")

BESIDE = ("select", "mask")


def _trained(net: nn.Module, method: str, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """``net`` (gated with BB) as after training with ``method``: a third of each gate's
    units pruned (seeded); DBB converted from it, with running statistics."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in bbdrop.gated_layers(net):
        layer.gate.prune_(torch.rand(layer.gate.num_units, generator=gen) > 1 / 3)
    if method == "dbb":
        bbdrop.convert_gates_(net, "dbb")
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(x)
    return net.eval()


def _tree(net: nn.Module) -> dict[str, type]:
    """Qualified name -> type of every module, what runs beside a layer left out."""
    return {name: type(m) for name, m in net.named_modules()
            if name.rpartition(".")[2] not in BESIDE}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "method"),
    [("lenet_500_300", "bb"), ("lenet_500_300", "dbb"), ("lenet5_caffe", "bb"),
     ("lenet5_caffe", "dbb")],
)  # fmt: skip
def test_the_compacted_network_keeps_every_module_at_its_name_with_its_type(
    model: str, method: str
) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    net = _trained(bbdrop.attach_gates_(create_model(model, num_classes=10), "bb"), method, x)
    dense = without_gates(net)
    small = bbdrop.compact(net, x)
    assert _tree(small) == _tree(dense)
    keys = {k for k in small.state_dict() if not any(f".{b}." in k for b in BESIDE)}
    assert keys == set(dense.state_dict())
    # what runs beside a layer is its child, applied by its hooks: gathers on LeNet's
    # input pixels (and LeNet5's flattened features), DBB's masks on each gated layer
    extra = {name: beside(m) for name, m in small.named_modules() if beside(m).children()}
    assert any(b.select is not None for b in extra.values())
    masked = {name for name, b in extra.items() if b.mask is not None}
    assert masked == ({n for n, _ in bbdrop.gated_layers(net)} if method == "dbb" else set())
    for name, b in extra.items():
        side = net.get_submodule(name).gate.bound_side()
        assert b.mask is None or b.mask_side == side, name
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)


def test_a_compacted_network_copies_and_pickles_with_what_runs_beside_its_layers() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    net = bbdrop.attach_gates_(create_model("lenet5_caffe", num_classes=10), "bb")
    small = bbdrop.compact(_trained(net, "dbb", x), x)
    for other in (copy.deepcopy(small), pickle.loads(pickle.dumps(small))):
        assert isinstance(other.fc1.mask, DependentMask) and other.fc1.mask is not small.fc1.mask
        with torch.no_grad():
            torch.testing.assert_close(other(x), small(x), rtol=0, atol=0)


def test_what_runs_beside_a_layer_is_attached_and_detached_by_its_hooks() -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(3, 2), torch.randn(4, 5)
    select = SelectFeatures(torch.tensor([0, 2, 4]), 5, -1)
    pi = torch.rand(3)
    mask = DependentMask(pi, pi.clone(), pi.clone(), pi.clone(), 1e-6, 0.2)
    mask.layout = (0, -1)
    attach_beside_(layer, Beside(select, mask))
    assert beside(layer) == Beside(select, mask, "input")
    torch.testing.assert_close(layer(x), layer.forward(mask(select(x))), rtol=0, atol=0)
    assert detach_beside_(layer) == Beside(select, mask, "input")
    assert not hasattr(layer, "select") and not layer._forward_pre_hooks
    out_mask = DependentMask(pi[:2], pi[:2], pi[:2], pi[:2], 1e-6, 0.2)
    attach_beside_(layer, Beside(mask=out_mask, mask_side="output"))
    y = x[:, :3]
    torch.testing.assert_close(layer(y), out_mask(layer.forward(y)), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"mask must be a bbdrop\.gates\.TestTimeMask, got Linear"):
        attach_beside_(layer, Beside(mask=nn.Linear(2, 2)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask_side must be 'input' or 'output', got 'both'"):
        attach_beside_(layer, Beside(mask=out_mask, mask_side="both"))  # type: ignore[arg-type]
    own = nn.Linear(3, 2)
    own.select = nn.Identity()  # a child of the user's own, by that name
    with pytest.raises(ValueError, match="has an attribute 'select' of its own"):
        attach_beside_(own, Beside(select=select))


@pytest.mark.parametrize("method", ["bb", "dbb"])
def test_a_compacted_transformer_block_keeps_its_layers_and_pytorchs_fast_path(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nn.TransformerEncoderLayer reads linear1.weight and linear2.weight itself in eval:
    the compacted block keeps them where it looks. Without hooks (BB) it runs PyTorch's
    fused kernel; with DBB's mask hook on linear2 it steps aside and runs its layers."""
    torch.manual_seed(0)
    x = torch.randn(16, 5, 16)
    net = bbdrop.attach_gates_(Encoder(), "bb", filter_fn=lambda n, m: n.endswith("linear2"))
    net = _trained(net, method, x)
    small = bbdrop.compact(net, x)
    assert _tree(small) == _tree(without_gates(net))
    block = small.block
    assert type(block.linear2) is nn.Linear and block.linear2.in_features < 32
    assert block.linear1.out_features == block.linear2.in_features
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counted)
    with torch.no_grad():
        out = small(x)
        assert calls == ([1] if method == "bb" else [])
        reference = net(x)
    assert float((out - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    hooked = [n for n, m in block.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == ([] if method == "bb" else ["linear2"])
    if method == "dbb":
        assert isinstance(block.linear2.mask, DependentMask)
