"""Gates on the heads of PyTorch's nn.MultiheadAttention (bbdrop.heads.FusedHeads): found
by attach_gates_ without help, applied through the attention's fused call, removed by
compact into a PrunedMultiheadAttention that computes what torch's attention does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compacting import check_compacted, check_onnx
from networks import Encoder
from torch import nn

import bbdrop
from bbdrop.compaction import without_gates
from bbdrop.heads import PrunedMultiheadAttention
from bbdrop.placement import coupled_groups

# the methods whose values are not a layer's weights (SSL and SVD take no heads)
HEAD_METHODS = ["bb", "dbb", "sbp", "l0", "vib"]
OFF = {  # per-unit parameter values that switch a unit off (as in test_heads)
    "bb": {"a_raw": -20.0, "b_raw": 20.0}, "l0": {"log_alpha": -20.0}, "vib": {"mu": 0.0},
    "sbp": {"mu": -20.0, "log_sigma": 2.0},
}  # fmt: skip


def gated(
    method: str, batch_first: bool = True, *, mlp: bool = True
) -> tuple[Encoder, torch.Tensor]:
    """An encoder block with 4 heads of 4 features, gated by ``method`` on its heads (and
    its MLP's hidden units, with ``mlp``), and its input."""
    torch.manual_seed(0)
    net = Encoder(d=16, heads=4, hidden=32, batch_first=batch_first)
    x = torch.randn(6, 5, 16)
    only_heads = lambda name, m: name == "block.self_attn"  # noqa: E731
    bbdrop.attach_gates_(net, method, example=x, pretrained=False,
                         filter_fn=None if mlp else only_heads)  # fmt: skip
    return net, x


@torch.no_grad()
def switch_off(net: Encoder, method: str, off: list[int]) -> None:
    gate = net.block.self_attn.out_proj.gate
    if method == "dbb":
        keep = torch.ones(4, dtype=torch.bool)
        keep[off] = False
        gate.prune_(keep)
        return
    for pname, value in OFF[method].items():
        getattr(gate, pname)[off] = value


def train_briefly(net: nn.Module, x: torch.Tensor) -> None:
    y = torch.arange(len(x)) % 3
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(net(x), y) + bbdrop.total_kl(net) / 100
        opt.zero_grad()
        loss.backward()
        gate_grads = [p.grad for p in net.block.self_attn.out_proj.gate.parameters()]
        assert any(g is not None and bool(g.abs().sum() > 0) for g in gate_grads)
        opt.step()
        assert torch.isfinite(loss)


def test_attaching_gates_each_mha_by_head_and_keeps_its_module_tree() -> None:
    torch.manual_seed(0)
    net = Encoder(d=16, heads=4, hidden=32)
    keys = set(net.state_dict())
    bbdrop.attach_gates_(net, "bb", example=torch.randn(6, 5, 16))
    attention = net.block.self_attn
    assert type(attention) is nn.MultiheadAttention
    gate = attention.out_proj.gate
    assert (gate.num_units, gate.unit_size) == (4, 4)
    assert keys <= set(net.state_dict())
    assert {k for k in net.state_dict() if k not in keys} <= {
        k for k in net.state_dict() if ".gate." in k
    }
    plan = coupled_groups(Encoder(d=16, heads=4, hidden=32), torch.randn(6, 5, 16))
    assert "self_attn" not in plan.skipped  # its heads can take a gate


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["bb", "sbp", "l0", "vib"])
def test_in_evaluation_the_gate_equals_its_values_folded_into_torchs_attention(
    method: str, batch_first: bool
) -> None:
    """An independent computation: the plain nn.MultiheadAttention, fused call and all,
    with the columns of out_proj scaled by each head's test-time value."""
    net, x = gated(method, batch_first, mlp=False)
    assert [name for name, _ in bbdrop.gated_layers(net)] == ["block.self_attn.out_proj"]
    switch_off(net, method, [1])
    net.eval()
    gate = net.block.self_attn.out_proj.gate
    values = (gate.gate_values() * gate.keep_mask()).detach()
    assert float(values[1]) == 0.0 and bool((values[[0, 2, 3]] > 0).all())
    plain = without_gates(net)
    with torch.no_grad():
        plain.block.self_attn.out_proj.weight.mul_(values.repeat_interleave(4))
        torch.testing.assert_close(net(x), plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", HEAD_METHODS)
def test_each_method_removes_the_heads_it_switched_off_exactly(
    method: str, batch_first: bool
) -> None:
    net, x = gated(method, batch_first)
    train_briefly(net, x)
    switch_off(net, method, [1, 3])
    attention = check_compacted(net, x).block.self_attn
    assert isinstance(attention, PrunedMultiheadAttention)
    assert (attention.num_heads, attention.kept_heads) == (2, [0, 2])
    assert attention.out_proj.weight.shape == (16, 8)


def test_a_routed_call_that_fails_leaves_the_projections_weight_in_place() -> None:
    net, _ = gated("bb")
    attention = net.block.self_attn
    weight = attention.out_proj.weight
    with pytest.raises(ValueError, match="batched input"):
        attention(torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 16))
    with pytest.raises(RuntimeError):  # torch's own error, on mismatched widths
        attention(torch.randn(2, 5, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    assert attention.out_proj.weight is weight
    assert isinstance(attention.out_proj.weight, nn.Parameter)
    assert "_bbdrop_projection" not in attention.__dict__


def attentions(kdim: int | None = None) -> tuple[nn.MultiheadAttention, nn.MultiheadAttention]:
    """A trained-looking nn.MultiheadAttention (6 heads of 4, non-zero biases) and its
    PrunedMultiheadAttention with every head kept: the two must compute the same."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(24, 6, kdim=kdim, vdim=kdim, batch_first=True).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    import copy

    pruned = PrunedMultiheadAttention(copy.deepcopy(mha), torch.ones(6, dtype=torch.bool)).eval()
    return mha, pruned


CALLS = {
    "self": lambda q, kv, n: ((q, q, q), {}),
    "cross": lambda q, kv, n: ((q, kv, kv), {}),
    "padding": lambda q, kv, n: ((q, kv, kv), {"key_padding_mask": torch.arange(7) > 4}),
    "causal bool": lambda q, kv, n: (
        (q, q, q),
        {"attn_mask": torch.ones(5, 5, dtype=torch.bool).triu(1), "is_causal": True},
    ),
    "float per head": lambda q, kv, n: ((q, kv, kv), {"attn_mask": torch.randn(n * 6, 5, 7)}),
    "weights per head": lambda q, kv, n: (
        (q, kv, kv),
        {"need_weights": True, "average_attn_weights": False},
    ),
    "weights averaged": lambda q, kv, n: ((q, kv, kv), {"need_weights": True}),
    "no weights": lambda q, kv, n: ((q, kv, kv), {"need_weights": False}),
}


@pytest.mark.parametrize("call", CALLS)
def test_the_pruned_attention_computes_what_torchs_does(call: str) -> None:
    mha, pruned = attentions()
    q, kv = torch.randn(3, 5, 24), torch.randn(3, 7, 24)
    args, kwargs = CALLS[call](q, kv, 3)
    kwargs["key_padding_mask"] = kwargs.get("key_padding_mask")
    if kwargs["key_padding_mask"] is not None:
        kwargs["key_padding_mask"] = kwargs["key_padding_mask"].expand(3, 7)
    with torch.no_grad():
        expected, got = mha(*args, **kwargs), pruned(*args, **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_the_pruned_attention_reads_separate_key_widths_and_unbatched_input() -> None:
    mha, pruned = attentions(kdim=10)
    q, kv = torch.randn(5, 24), torch.randn(7, 10)  # one sequence, no batch dimension
    with torch.no_grad():
        expected, got = mha(q, kv, kv), pruned(q, kv, kv)
    assert got[0].shape == (5, 24)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_the_costs_count_the_heads_and_what_removing_them_saves() -> None:
    net, x = gated("bb")
    t, e, h = 5, 16, 32  # tokens, model width, MLP hidden units
    costs = bbdrop.network_costs(net.eval(), x)
    heads = dict((g.name, g) for g in costs.groups)["block.self_attn.out_proj"]
    assert heads.reader_flops == 2 * t * e * e  # out_proj reads the heads
    dense = 2 * t * e * 3 * e + 2 * t * e * e + 2 * t * (e * h + h * e) + 2 * e * 3
    assert costs.dense_flops == dense  # the attention products: uncounted on the CPU
    switch_off(net, "bb", [1, 3])
    costs = bbdrop.network_costs(net.eval(), x)
    # half the heads: half the rows of q, k, v, half the columns of out_proj
    assert costs.flops == dense - (2 * t * e * 3 * e + 2 * t * e * e) // 2
    assert dict((g.name, g) for g in costs.groups)["block.self_attn.out_proj"].units == 2


@pytest.mark.slow  # the ONNX exporter
def test_the_pruned_attention_exports_to_onnx_with_the_same_outputs(tmp_path: Path) -> None:
    net, x = gated("dbb", batch_first=False)
    train_briefly(net, x)
    switch_off(net, "dbb", [0, 3])
    check_onnx(bbdrop.compact(net.eval(), x), x, tmp_path / "small.onnx")


class Stack(nn.Module):
    """Two encoder layers in PyTorch's nn.TransformerEncoder, fed a padded batch: in
    evaluation the stack packs it into a nested tensor, which a gate cannot read."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = torch.zeros(x.shape[:2], dtype=torch.bool)
        padding[:, 4:] = True  # the last token of every sequence is padding
        return self.head(self.encoder(x, src_key_padding_mask=padding)[:, :4].mean(1))


@pytest.mark.parametrize("heads_off", [[1, 2], []])
def test_a_transformer_stack_with_a_padded_batch_compacts_and_saves_as_it_can(
    heads_off: list[int], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    net, x = Stack(), torch.randn(6, 5, 16)
    assert net.encoder.use_nested_tensor
    bbdrop.attach_gates_(net, "bb", example=x, pretrained=False)
    assert not net.encoder.use_nested_tensor  # held while gates are on
    with torch.no_grad():
        for layer in net.encoder.layers:
            for name, value in OFF["bb"].items():
                getattr(layer.self_attn.out_proj.gate, name)[heads_off] = value
    net.eval()
    with torch.no_grad():
        reference = net(x)
    small = bbdrop.compact(net, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), reference, rtol=1e-5, atol=1e-5)
    kinds = {type(layer.self_attn) for layer in small.encoder.layers}
    if heads_off:  # the stack cannot pack for the pruned attention; no compact file
        assert kinds == {PrunedMultiheadAttention} and not small.encoder.use_nested_tensor
        with pytest.raises(ValueError, match=r"heads removed.*torch\.save"):
            bbdrop.save_compact(small, tmp_path / "small.safetensors")
    else:  # all kept: torch's attention, packing again, a compact file
        assert kinds == {nn.MultiheadAttention} and small.encoder.use_nested_tensor
        bbdrop.save_compact(small, tmp_path / "small.safetensors", template=Stack())
