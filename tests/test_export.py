"""Compacted networks through their safetensors file, torch.export and ONNX: the same
outputs back, and clear one-line errors for files that are not what they should be."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.compaction import (
    Beside,
    DependentMask,
    SelectFeatures,
    attach_beside_,
    beside,
    detach_beside_,
)
from bbdrop.models import create_model

pytest.importorskip("safetensors")


def _compacted(model: str, method: str, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """A compacted paper network with pruned units (a third of each gate's)."""
    torch.manual_seed(seed)
    net = bbdrop.attach_gates_(create_model(model, num_classes=10), "bb")
    for _, gl in bbdrop.gated_layers(net):
        gl.gate.prune_(torch.rand(gl.gate.num_units) > 0.33)
    if method == "dbb":
        bbdrop.convert_gates_(net, "dbb")
    net.train()
    with torch.no_grad():
        net(torch.randn(32, *shape))
    return bbdrop.compact(net.eval(), torch.randn(4, *shape))


@pytest.mark.parametrize(
    ("model", "method", "shape"),
    [("lenet_500_300", "bb", (1, 28, 28)), ("lenet5_caffe", "dbb", (1, 28, 28)),
     pytest.param("vgg_like", "bb", (3, 32, 32), marks=pytest.mark.slow)],  # a second
)  # fmt: skip
def test_a_compact_file_loads_back_into_the_same_network_without_unpickling(
    tmp_path: Path, model: str, method: str, shape: tuple[int, ...]
) -> None:
    small = _compacted(model, method, shape)
    path = bbdrop.save_compact(small, tmp_path / "net.safetensors", model, 10)
    loaded = bbdrop.load_compact(path)
    x = torch.randn(5, *shape)
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in small.modules()]
    # the description is plain JSON in the file's header: the widths per layer
    size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + size])["__metadata__"]
    description = json.loads(header["bbdrop"])
    assert description["model"] == {"name": model, "num_classes": 10}
    first = next(iter(description["layers"].values()))
    assert description["version"] == 2 and first["type"] in ("Linear", "Conv2d")
    # each layer at its name, what runs beside it (DBB's masks) described with it
    assert (method == "dbb") == any("mask" in spec for spec in description["layers"].values())


def test_a_float64_network_loads_back_in_float64(tmp_path: Path) -> None:
    small = _compacted("lenet5_caffe", "bb", (1, 28, 28)).double()
    path = bbdrop.save_compact(small, tmp_path / "net.safetensors", "lenet5_caffe", 10)
    loaded = bbdrop.load_compact(path)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_a_user_network_loads_into_its_template_and_not_without_one(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    bbdrop.attach_gates_(net, "bb")
    net[2].gate.prune_(torch.tensor([True, False] * 4))
    net[0].gate.prune_(torch.tensor([True, True, False, True, True, True]))
    small = bbdrop.compact(net.eval(), torch.randn(3, 6))
    assert type(small[0]) is nn.Linear and isinstance(small[0].select, SelectFeatures)
    path = bbdrop.save_compact(small, tmp_path / "mine.safetensors")
    with pytest.raises(ValueError, match=r"saved without a bbdrop model name: pass the uncompac"):
        bbdrop.load_compact(path)
    template = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    loaded = bbdrop.load_compact(path, template=template)
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    assert loaded[2].in_features == 4


def test_a_mask_beside_a_batch_norm_loads_back(tmp_path: Path) -> None:
    """A coupled group's DBB mask may sit on a batch norm's output: the file holds it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    pi = torch.rand(8)
    mask = DependentMask(pi, torch.randn(8), torch.rand(8), torch.randn(8), 1e-6, 0.3)
    attach_beside_(net[1], Beside(mask=mask, mask_side="output"))
    path = bbdrop.save_compact(net, tmp_path / "bn.safetensors")
    template = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    loaded = bbdrop.load_compact(path, template=template)
    assert beside(loaded[1]).mask_side == "output" and loaded[1].mask.layout == (0, 1)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
        assert not torch.equal(loaded(x), without_beside(loaded)(x))  # the mask acts


def without_beside(net: nn.Module) -> nn.Module:
    net = copy.deepcopy(net)
    for m in net.modules():
        detach_beside_(m)
    return net


def test_bad_compact_files_get_one_line_errors(tmp_path: Path) -> None:
    small = _compacted("lenet5_caffe", "bb", (1, 28, 28))
    path = bbdrop.save_compact(small, tmp_path / "net.safetensors", "lenet5_caffe", 10)
    with pytest.raises(FileNotFoundError, match=r"no compact file .*; write one with bbdrop compa"):
        bbdrop.load_compact(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"a compact file ends in .safetensors, got 'net.pt'"):
        bbdrop.save_compact(small, tmp_path / "net.pt")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])  # a copy that stopped short
    with pytest.raises(ValueError, match=r"cut.safetensors is not a readable bbdrop compact file"):
        bbdrop.load_compact(cut)
    with pytest.raises(ValueError, match=r"does not fit the network it is loaded into"):
        bbdrop.load_compact(path, template=create_model("lenet_500_300", num_classes=10))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(other), metadata={"bbdrop": json.dumps({"format": "x"})})
    with pytest.raises(ValueError, match=r"not a bbdrop compact file of version 1 or 2"):
        bbdrop.load_compact(other)
    for err in (ValueError, FileNotFoundError):  # one line each
        try:
            bbdrop.load_compact(cut if err is ValueError else tmp_path / "missing.safetensors")
        except err as e:
            assert "\n" not in str(e)


def test_a_failed_save_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    small = _compacted("lenet_500_300", "bb", (1, 28, 28))
    target = tmp_path / "net.safetensors"
    bbdrop.save_compact(small, target, "lenet_500_300", 10)
    before = target.read_bytes()

    def broken(*args: object, **kwargs: object) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        bbdrop.save_compact(small, target, "lenet_500_300", 10)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "net.safetensors"]  # fmt: skip


def test_a_missing_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'bbdrop\[export\]'"):
        bbdrop.save_compact(nn.Linear(2, 2), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_torch_export_of_a_compacted_network_computes_the_same() -> None:
    small = _compacted("lenet5_caffe", "dbb", (1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    program = torch.export.export(small, (x,))
    torch.testing.assert_close(program.module()(x), small(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_with_any_batch_size(tmp_path: Path) -> None:
    """LeNet5 with DBB: Linear, Conv2d, the gather and DBB's mask all go through ONNX."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    small = _compacted("lenet5_caffe", "dbb", (1, 28, 28))
    assert any(isinstance(m, DependentMask) for m in small.modules())
    path = bbdrop.export_onnx(small, torch.randn(2, 1, 28, 28), tmp_path / "net.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = torch.randn(n, 1, 28, 28)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), small(x), rtol=0, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]
