"""Run-time DBB: layers that read only the units DBB switched on compute what the
compacted (and the gated) network computes, with fewer FLOPs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.compaction import beside
from bbdrop.metrics import measured_flops as _flops
from bbdrop.models import create_model
from bbdrop.runtime import SkipZeroInputs, runtime_pruned

pytest.importorskip("torch_pruning")


def _dbb(model: str, shape: tuple[int, ...]) -> nn.Module:
    """A DBB network as after the two-stage scheme: a third of the units pruned by BB,
    shifts that switch a good share of the rest off per example."""
    torch.manual_seed(0)
    net = bbdrop.attach_gates_(create_model(model, num_classes=10), "bb")
    for _, gl in bbdrop.gated_layers(net):
        gl.gate.prune_(torch.rand(gl.gate.num_units) > 0.33)
    bbdrop.convert_gates_(net, "dbb")
    with torch.no_grad():
        for _, gl in bbdrop.gated_layers(net):
            gl.gate.shift.add_(torch.randn(gl.gate.num_units) * 0.6 - 0.3)
        net.train()
        net(torch.randn(64, *shape))
    return net.eval()


@pytest.mark.parametrize(
    ("model", "shape", "skipping"),
    [("lenet_500_300", (1, 28, 28), ["fc1", "fc2", "fc3"]),
     ("lenet5_caffe", (1, 28, 28), ["conv2", "fc1", "fc2"])],
)  # fmt: skip
def test_run_time_dbb_computes_the_masked_network_with_fewer_flops(
    model: str, shape: tuple[int, ...], skipping: list[str]
) -> None:
    net = _dbb(model, shape)
    small = bbdrop.compact(net, torch.randn(8, *shape))
    fast = runtime_pruned(small, torch.randn(2, *shape))
    assert [n for n, m in fast.named_modules() if isinstance(m, SkipZeroInputs)] == skipping
    for name in skipping:  # the layer's mask (and gather) run beside its skipping now
        skip, layer = fast.get_submodule(name), small.get_submodule(name)
        assert type(skip.mask) is type(layer.mask) and type(skip.layer) is type(layer)
        assert not beside(skip.layer).children()
    for n in (1, 16):
        x = torch.randn(n, *shape)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=0, atol=1e-5)
    x = torch.randn(1, *shape)
    assert _flops(fast, x) < 0.9 * _flops(small, x)


@pytest.mark.slow
def test_layers_after_batch_norm_are_not_skipped() -> None:
    """VGG's gates sit before batch norm, which turns a zero into its shift: only the two
    dense layers, after the flatten, read zeros."""
    net = _dbb("vgg_like", (3, 32, 32))
    with warnings.catch_warnings():  # BN shifts into padded convolutions: not the point here
        warnings.simplefilter("ignore", bbdrop.compaction.CompactWarning)
        small = bbdrop.compact(net, torch.randn(4, 3, 32, 32))
    fast = runtime_pruned(small, torch.randn(2, 3, 32, 32))
    assert [n for n, m in fast.named_modules() if isinstance(m, SkipZeroInputs)] == [
        "classifier.fc1", "classifier.fc2"]  # fmt: skip
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), small(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_skip_zero_inputs_matches_the_layer_and_falls_back_when_few_are_zero(kind: str) -> None:
    torch.manual_seed(1)
    layer = nn.Linear(10, 4) if kind == "dense" else nn.Conv2d(10, 4, 3, padding=1)
    x = torch.randn(3, 10) if kind == "dense" else torch.randn(3, 10, 5, 5)
    x[:, [0, 3, 4, 8]] = 0  # four inputs off in every example
    x[1, 9] = 0  # one off in one example only: still in use
    skip = SkipZeroInputs(layer)
    with torch.no_grad():
        torch.testing.assert_close(skip(x), layer(x), rtol=0, atol=1e-6)
        assert _flops(skip, x) == pytest.approx(_flops(layer, x) * 6 / 10)
        dense = torch.randn_like(x)
        assert _flops(skip, dense) == _flops(layer, dense)  # nothing to skip: the layer
    for mode in ("reflect", "circular", "replicate") if kind == "conv" else ():  # its padding
        padded = nn.Conv2d(10, 4, 3, padding=1, padding_mode=mode)
        with torch.no_grad():
            torch.testing.assert_close(SkipZeroInputs(padded)(x), padded(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"nn.Linear or nn.Conv2d without groups"):
        SkipZeroInputs(nn.Conv2d(4, 4, 3, groups=2))
    # -0.0 and negative inputs count as off and on; a NaN or inf stays in use, as in the layer
    x[:, 0] = -0.0
    x[2, 1] = -5.0
    x[1, 3] = float("nan")
    x[0, 4] = float("inf")
    with torch.no_grad():
        assert _flops(skip, x) == pytest.approx(_flops(layer, x) * 8 / 10)  # 0 and 8 off
        torch.testing.assert_close(skip(x), layer(x), rtol=0, atol=1e-6, equal_nan=True)


def test_run_time_pruning_needs_dbb_and_a_chain() -> None:
    net = bbdrop.attach_gates_(create_model("lenet_500_300", num_classes=10), "bb").eval()
    small = bbdrop.compact(net, torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="has no DBB mask to skip by"):
        runtime_pruned(small, torch.randn(2, 1, 28, 28))

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x + self.a(x))

    branched = bbdrop.attach_gates_(Skip(), "bb")
    bbdrop.convert_gates_(branched, "dbb")
    branched.train()(torch.randn(8, 6))
    small = bbdrop.compact(branched.eval(), torch.randn(4, 6))
    with pytest.raises(ValueError, match="does not read the output of the layer before it"):
        runtime_pruned(small, torch.randn(2, 6))
