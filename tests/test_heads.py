"""Gates on attention heads (bbdrop.heads): one unit per head of a hand-written attention,
applied to the head's whole output for each example, removed whole by compact (the
rows of q, k and v, the columns of o and one from the head count), exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from compacting import check_compacted
from networks import PreLN
from torch import nn

import bbdrop
from bbdrop.compaction import without_gates
from bbdrop.gates.l0 import l0_penalty
from bbdrop.placement import coupled_groups

SPEC = bbdrop.AttentionHeads(q="q", k="k", v="v", o="o", count="heads")
HEAD_METHODS = ["bb", "sbp", "l0", "vib"]
# Per-unit parameter values that switch a unit off (as in test_any_network)
OFF = {
    "bb": {"a_raw": -20.0, "b_raw": 20.0}, "l0": {"log_alpha": -20.0}, "vib": {"mu": 0.0},
    "sbp": {"mu": -20.0, "log_sigma": 2.0},
}  # fmt: skip


class SeqFirst(PreLN):
    """The pre-LN block on (T, N, D) inputs: o reads (T, N, H * dh)."""

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        t, n, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (T, N, H * dh) -> (N, H, T, dh)
            return y.reshape(t, n, self.heads, -1).permute(1, 2, 0, 3)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.o((att @ v).permute(2, 0, 1, 3).reshape(t, n, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(0))


def gated(method: str, *, seq_first: bool = False, mlp: bool = True):
    """The pre-LN block with 4 heads of 4 features, gated by ``method`` on its heads (and
    its MLP's hidden units, with ``mlp``), and an input batch."""
    torch.manual_seed(0)
    net = (SeqFirst if seq_first else PreLN)(d=16, heads=4, hidden=32)
    x = torch.randn(5, 8, 16) if seq_first else torch.randn(8, 5, 16)
    spec = bbdrop.AttentionHeads("q", "k", "v", "o", "heads", batch_first=not seq_first)
    bbdrop.attach_gates_(net, method, example=x, heads=[spec], pretrained=False,
                         filter_fn=None if mlp else (lambda name, m: False))  # fmt: skip
    return net, x


def train_briefly(net: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    y = torch.randint(0, 3, (x.shape[1] if isinstance(net, SeqFirst) else x.shape[0],))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), y) + bbdrop.total_kl(net) / 100
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)


@torch.no_grad()
def switch_off(net: nn.Module, method: str, off: list[int]) -> None:
    for pname, value in OFF[method].items():
        getattr(net.o.gate, pname)[off] = value


def inputs_of(module: nn.Module) -> list[torch.Tensor]:
    """A list that a pre-hook registered now fills with ``module``'s inputs."""
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("seq_first", [False, True])
def test_a_head_gate_scales_each_heads_whole_output_per_example(seq_first: bool) -> None:
    torch.manual_seed(0)
    net = (SeqFirst if seq_first else PreLN)(d=16, heads=4, hidden=32)
    before = inputs_of(net.o)  # registered before the gate's hook: the ungated input
    spec = bbdrop.AttentionHeads("q", "k", "v", "o", "heads", batch_first=not seq_first)
    x = torch.randn(5, 8, 16) if seq_first else torch.randn(8, 5, 16)
    bbdrop.attach_gates_(net, "bb", example=x, heads=[spec], pretrained=False)
    after = inputs_of(net.o)  # after the gate's hook: the gated input
    before.clear()
    net.train()
    net(x)
    plain, masked = before[-1], after[-1]
    if seq_first:  # to (N, T, H * dh)
        plain, masked = plain.transpose(0, 1), masked.transpose(0, 1)
    ratio = (masked / plain).unflatten(-1, (4, 4))  # (N, T, H, dh)
    per_head = ratio[:, :1, :, :1]  # one value per example and head ...
    assert torch.allclose(ratio, per_head.expand_as(ratio), atol=1e-5)  # ... everywhere
    values = per_head.flatten(1)
    assert bool(((values >= 0) & (values <= 1)).all())
    assert not torch.allclose(values[0], values[1])  # drawn per example


def test_in_evaluation_a_head_gate_equals_its_values_folded_into_o() -> None:
    net, x = gated("bb", mlp=False)
    assert [name for name, _ in bbdrop.gated_layers(net)] == ["o"]
    switch_off(net, "bb", [1])
    net.eval()
    values = (net.o.gate.gate_values() * net.o.gate.keep_mask()).detach()
    plain = without_gates(net)  # an independent computation: o's columns scaled per head
    with torch.no_grad():
        plain.o.weight.mul_(values.repeat_interleave(4))
    assert float(values[1]) == 0.0 and bool((values[[0, 2, 3]] > 0).all())
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_each_method_removes_the_heads_it_switched_off_exactly(method: str) -> None:
    net, x = gated(method)
    train_briefly(net, x)
    switch_off(net, method, [0, 2])
    assert bbdrop.units_kept(net)["o"] == 2
    small = check_compacted(net, x)
    assert small.heads == 2
    assert small.q.weight.shape == small.k.weight.shape == (8, 16)
    assert small.v.weight.shape == (8, 16) and small.v.bias.shape == (8,)
    assert small.o.weight.shape == (16, 8) and small.o.in_features == 8
    dense = sum(p.numel() for p in without_gates(net).parameters())
    assert sum(p.numel() for p in small.parameters()) == dense - 2 * (3 * 4 * 17 + 4 * 16)
    assert net.heads == 4  # the gated network is not changed


def test_the_kept_heads_are_the_right_ones() -> None:
    """After removing heads 0 and 2, the compacted q, k, v, o are the rows and columns of
    heads 1 and 3 (o's scaled by the gate's values)."""
    net, x = gated("vib")
    switch_off(net, "vib", [0, 2])
    small = check_compacted(net, x)
    rows = torch.cat([torch.arange(4, 8), torch.arange(12, 16)])
    for name in ("q", "k", "v"):
        torch.testing.assert_close(getattr(small, name).weight, getattr(net, name).weight[rows])
    values = net.o.gate.gate_values()[[1, 3]].repeat_interleave(4)
    torch.testing.assert_close(small.o.weight, net.o.weight[:, rows] * values)


@pytest.mark.slow  # the ONNX exporter
def test_a_block_whose_every_head_is_off_keeps_one_head_computing_zeros(tmp_path: Path) -> None:
    """One head stays (torch's layers need a feature): its features, which carry zeros,
    go down to one each; the output projection's bias stays."""
    onnxruntime = pytest.importorskip("onnxruntime")
    net, x = gated("bb")
    switch_off(net, "bb", [0, 1, 2, 3])
    small = check_compacted(net, x)
    assert small.heads == 1 and small.q.out_features == small.k.out_features == 1
    assert small.v.out_features == small.o.in_features == 1
    assert bool(small.o.weight.eq(0).all()) and bool(small.o.bias.ne(0).any())
    bbdrop.export_onnx(small, x, tmp_path / "zero.onnx")  # no zero-sized reshape
    session = onnxruntime.InferenceSession(str(tmp_path / "zero.onnx"))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), small(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seq_first", [False, True])
def test_dbb_on_heads_compacts_with_its_mask_over_heads(seq_first: bool) -> None:
    net, x = gated("bb", seq_first=seq_first)
    train_briefly(net, x)
    switch_off(net, "bb", [3])
    bbdrop.convert_gates_(net, "dbb")
    assert net.o.gate.unit_size == 4 and net.o.gate.heads == net.o.gate.heads
    train_briefly(net, x)  # DBB's running statistics
    small = check_compacted(net, x)
    assert small.heads == 3
    assert small.o.mask.unit_size == 4 and small.o.mask.pi.numel() == 3
    costs = bbdrop.network_costs(net, x)
    (group,) = [g for g in costs.groups if g.name == "o"]
    assert group.units == 3 and 0 < group.active <= 3


@pytest.mark.slow  # the ONNX exporter
def test_heads_go_to_onnx_and_not_into_a_compact_file(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    net, x = gated("bb")
    switch_off(net, "bb", [1])
    bbdrop.convert_gates_(net, "dbb")
    train_briefly(net, x)
    small = check_compacted(net, x)
    path = tmp_path / "heads.onnx"
    bbdrop.export_onnx(small, x, path)
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), small(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attention heads of 4 features: export"):
        bbdrop.save_compact(small, tmp_path / "heads.safetensors")


def test_l0_weight_term_counts_a_heads_columns_of_o_together() -> None:
    net, _ = gated("l0")
    gate = net.o.gate
    gate.weight_decay = 0.5
    p = gate.prob_nonzero()
    w, b = net.o.weight.detach(), net.o.bias.detach()
    by_head = [
        p[h] * (gate.lamb * 16 * 4 + 0.25 * w[:, 4 * h : 4 * h + 4].square().sum())
        for h in range(4)
    ]
    expected = sum(by_head) + 0.25 * b.square().sum()
    torch.testing.assert_close(gate.regularizer(net.o), expected)
    torch.testing.assert_close(
        l0_penalty(p, w.unflatten(1, (4, 4)), b, 1, gate.lamb, 0.5), expected
    )


def test_mha_and_hand_written_attention_say_where_heads_can_take_gates() -> None:
    encoder = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    assert "self_attn" not in coupled_groups(encoder, torch.randn(4, 5, 16)).skipped
    encoder.self_attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
    plan = coupled_groups(encoder, torch.randn(4, 5, 16))
    assert "add_bias_kv" in plan.skipped["self_attn"]  # torch's attention, not per head
    plan = coupled_groups(PreLN(), torch.randn(4, 5, 16))
    assert "AttentionHeads" in " ".join(plan.skipped.values())


@pytest.mark.parametrize(
    ("heads", "kwargs", "message"),
    [
        ([bbdrop.AttentionHeads("q", "k", "v", "nope", "heads")], {}, "'nope' is not a module"),
        ([bbdrop.AttentionHeads("q", "k", "v", "ln1", "heads")], {}, "must be nn.Linear"),
        ([bbdrop.AttentionHeads("q", "k", "v", "o", "fc1")], {}, "positive int attribute"),
        ([bbdrop.AttentionHeads("q", "k", "v", "o", "nothing.heads")], {}, "positive int"),
        ([bbdrop.AttentionHeads("q", "k", "v", "fc2", "heads")], {}, "o reads 32 features"),
        ([bbdrop.AttentionHeads("q", "q", "v", "o", "heads")], {}, "packed q/k/v"),
        ([SPEC, SPEC], {}, "'o' twice"),
        (SPEC, {}, "a list of bbdrop.AttentionHeads"),
        ([SPEC], {"gate": "svd"}, "heads take bb, dbb, l0, sbp, vib"),
        ([SPEC], {"gate": "ssl"}, "cannot gate attention heads"),
        ([SPEC], {"placement": "layers"}, "placement='groups'"),
    ],
)  # fmt: skip
def test_bad_heads_get_one_clear_error_and_leave_the_model_alone(
    heads: object, kwargs: dict, message: str
) -> None:
    net = PreLN(d=16, heads=4, hidden=32)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises((ValueError, TypeError), match=message):
        bbdrop.attach_gates_(net, example=torch.randn(4, 5, 16), heads=heads, **kwargs)
    assert not list(bbdrop.gated_layers(net))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_uneven_head_widths_are_refused() -> None:
    net = PreLN(d=16, heads=3, hidden=32)
    with pytest.raises(ValueError, match="multiple of the 3 heads"):
        bbdrop.attach_gates_(net, example=torch.randn(4, 5, 16), heads=[SPEC])
