"""A new method is one file: toy gates defined here only (an input-dependent one with its
test-time mask, and a static one) go through attach, training, compaction, run-time
pruning, the compact file and ONNX without a change anywhere else in bbdrop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.gates import Gate, TestTimeMask, registered_gate
from bbdrop.gates.masks import Field
from bbdrop.runtime import SkipZeroInputs
from bbdrop.train.loop import train_stage

THRESHOLD = 0.4


def _pooled(x: Tensor) -> Tensor:
    """(N, K): ``x`` averaged over positions for (N, K, H, W)."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x


class ToyPooledMask(TestTimeMask):
    """The toy gate's evaluation on some of its units: ``x * m``, ``m = z 1[z > t]``,
    ``z = keep sigmoid(w h + c)``, ``h`` the pooled input."""

    fields: ClassVar[dict[str, Field]] = {"units": "width", "threshold": ("number", 0, 1, "open")}

    def __init__(self, keep: Tensor, w: Tensor, c: Tensor, threshold: float) -> None:
        super().__init__()
        for name, value in (("keep", keep), ("w", w), ("c", c)):
            self.register_buffer(name, value.detach().clone())
        self.threshold = float(threshold)

    def mask(self, x: Tensor) -> Tensor:
        z = self.keep * torch.sigmoid(self.w * _pooled(x) + self.c)
        return F.threshold(z, self.threshold, 0.0)

    def settings(self) -> dict[str, Any]:
        return {"units": self.keep.numel(), "threshold": self.threshold}

    @classmethod
    def empty(cls, settings: dict[str, Any]) -> ToyPooledMask:
        z = torch.zeros(settings["units"])
        return cls(z, z, z, settings["threshold"])


class ToyStaticGate(Gate):
    """Unit k times ``sigmoid(logit_k)``, zero at test time where that is <= 1/2."""

    def __init__(self, num_units: int, kl_scale: float = 1.0) -> None:
        super().__init__(num_units, kl_scale)
        self.logit = nn.Parameter(torch.full((num_units,), 2.0))

    def regularizer(self, layer: nn.Module) -> Tensor:
        return torch.sigmoid(self.logit).sum()

    def gate_values(self) -> Tensor:
        keep = torch.sigmoid(self.logit)
        return keep * (keep > 0.5) * self.static_keep

    def mask(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logit) if self.training else self.gate_values()


class ToyDependentGate(ToyStaticGate):
    """Unit k times ``keep_k sigmoid(w_k h_nk + c_k)``: the static gate's learned keep
    ``sigmoid(logit_k)`` (zero at test time where it is <= 1/2) times a per-example
    sigmoid of the pooled input, zero at test time where the product is <= 0.4."""

    input_dependent = True

    def __init__(self, num_units: int, kl_scale: float = 1.0) -> None:
        super().__init__(num_units, kl_scale)
        self.w = nn.Parameter(torch.full((num_units,), 4.0))
        self.c = nn.Parameter(torch.zeros(num_units))

    def mask(self, x: Tensor) -> Tensor:
        z = super().mask(x) * torch.sigmoid(self.w * _pooled(x) + self.c)
        return z if self.training else F.threshold(z, THRESHOLD, 0.0)

    def to_module(self, units: list[int]) -> ToyPooledMask:
        index = torch.as_tensor(units, dtype=torch.long, device=self.logit.device)
        return ToyPooledMask(self.gate_values()[index], self.w[index], self.c[index], THRESHOLD)


def _net() -> nn.Sequential:
    """A chain: convolution, pooling, two dense layers (three gates: 8 channels, 72 and
    16 features)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(72, 16), nn.ReLU(), nn.Linear(16, 3))  # fmt: skip


def _trained(name: str, cls: type[Gate]) -> Iterator[tuple[nn.Module, Tensor]]:
    """The network with ``cls`` registered as ``name`` and attached, after a short
    train_stage, with a few units of each gate pruned for every input; and an example."""
    torch.manual_seed(0)
    x = torch.randn(128, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    with registered_gate(name, cls):
        net = bbdrop.attach_gates_(_net(), name)
        batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]
        history = train_stage(net, batches, stage=name, epochs=2, num_train=128,
                              optim=OptimConfig(), evaluate_on=(x, y))  # fmt: skip
        assert all(r.loss == r.loss for r in history)  # no NaN
        with torch.no_grad():
            for _, g in bbdrop.gated_layers(net):
                g.gate.logit[::3] = -3.0  # learned away, for every input
        yield net.eval(), x[:6]


@pytest.fixture
def dependent() -> Iterator[tuple[nn.Module, Tensor]]:
    yield from _trained("toy-dependent", ToyDependentGate)


@pytest.fixture
def static() -> Iterator[tuple[nn.Module, Tensor]]:
    yield from _trained("toy-static", ToyStaticGate)


def _widths(net: nn.Module) -> list[int]:
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]  # fmt: skip


def test_an_input_dependent_gate_of_one_file_is_compacted_pruned_and_saved(
    dependent: tuple[nn.Module, Tensor], tmp_path: Path
) -> None:
    net, x = dependent
    want = net(x)
    small = bbdrop.compact(net, x)
    torch.testing.assert_close(small(x), want, rtol=0, atol=1e-5)
    assert not list(bbdrop.gated_layers(small))
    assert sum(_widths(small)) < sum(_widths(_net())) and _widths(small)[-1] == 3  # removed
    masks = [m for m in small.modules() if isinstance(m, ToyPooledMask)]
    assert len(masks) == 3  # one per gate, on the kept units
    assert masks[0].keep.numel() == bbdrop.units_kept(net)["0"]
    assert type(small[0]) is nn.Conv2d and small[0].mask is masks[0]  # beside its layer
    assert (masks[0].mask(small[0].forward(x)) == 0).any()  # some units off for some examples
    fast = bbdrop.runtime_pruned(small, x)
    assert any(isinstance(m, SkipZeroInputs) for m in fast.modules())
    torch.testing.assert_close(fast(x), small(x), rtol=0, atol=1e-5)
    path = bbdrop.save_compact(small, tmp_path / "toy.safetensors")
    loaded = bbdrop.load_compact(path, template=_net())
    assert [type(m) for m in loaded.modules()] == [type(m) for m in small.modules()]
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


@pytest.mark.slow
def test_an_input_dependent_gate_of_one_file_exports_to_onnx(
    dependent: tuple[nn.Module, Tensor], tmp_path: Path
) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net, x = dependent
    small = bbdrop.compact(net, x)
    path = bbdrop.export_onnx(small, x[:2], tmp_path / "toy.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), small(x), rtol=0, atol=1e-5)


def test_a_static_gate_of_one_file_is_compacted_and_saved(
    static: tuple[nn.Module, Tensor], tmp_path: Path
) -> None:
    net, x = static
    small = bbdrop.compact(net, x)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    assert sum(_widths(small)) < sum(_widths(_net()))
    assert not any(isinstance(m, TestTimeMask) for m in small.modules())
    loaded = bbdrop.load_compact(bbdrop.save_compact(small, tmp_path / "s.safetensors"),
                                 template=_net())  # fmt: skip
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_the_toy_gates_are_registered_for_their_block_only(
    dependent: tuple[nn.Module, Tensor],
) -> None:
    assert "toy-dependent" in bbdrop.list_gates()
    assert ToyDependentGate.registry_name == "toy-dependent"


def test_after_a_block_the_toy_gates_are_gone() -> None:
    assert not {"toy-dependent", "toy-static"} & set(bbdrop.list_gates())
    assert "registry_name" not in ToyDependentGate.__dict__


def test_a_mask_name_is_taken_once_and_its_fields_are_checked() -> None:
    with pytest.raises(TypeError, match="'DependentMask' is already registered"):

        class DependentMask(ToyPooledMask):
            pass

    with pytest.raises(TypeError, match=r"fields\['eps'\] must be 'width', 'flag'"):

        class BadFields(ToyPooledMask):
            fields: ClassVar[dict[str, Field]] = {"eps": ("number", 0, 1)}
