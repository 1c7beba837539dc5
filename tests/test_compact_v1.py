"""Compact files of version 1, written before a compacted network kept the module tree
(a layer with a gather or a mask was a ``PrunedLayer``), load into today's structure.

``fixtures/compact-v1.safetensors`` was written by bbdrop's version-1 writer (commit
679c8e8) from :class:`SmallCNN` with DBB gates, compacted: its conv carries a mask on
its output, fc1 a gather and a mask on its input, fc2 a mask on its input.
``fixtures/compact-v1-io.safetensors`` holds an input batch ``x`` and that compacted
network's output ``y`` on it.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbdrop
from bbdrop.compaction import DependentMask, SelectFeatures, beside

safetensors_torch = pytest.importorskip("safetensors.torch")

FIXTURES = Path(__file__).parent / "fixtures"


class SmallCNN(nn.Module):
    """conv -> relu -> max-pool -> flatten -> fc1 -> relu -> fc2, on 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc1 = nn.Linear(54, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


def _description(data: bytes) -> dict[str, Any]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["bbdrop"])


def test_a_version_1_file_loads_into_the_module_tree_of_today(tmp_path: Path) -> None:
    path = FIXTURES / "compact-v1.safetensors"
    assert _description(path.read_bytes())["version"] == 1
    net = bbdrop.load_compact(path, template=SmallCNN())
    io = safetensors_torch.load_file(FIXTURES / "compact-v1-io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(net(io["x"]), io["y"], rtol=0, atol=0)
    assert [(n, type(m)) for n, m in net.named_children()] == [
        ("conv", nn.Conv2d), ("fc1", nn.Linear), ("fc2", nn.Linear)]  # fmt: skip
    conv, fc1, fc2 = beside(net.conv), beside(net.fc1), beside(net.fc2)
    assert (conv.select, conv.mask_side, isinstance(conv.mask, DependentMask)) == (
        None, "output", True)  # fmt: skip
    assert isinstance(fc1.select, SelectFeatures) and fc1.select.dim == -1
    assert fc1.mask_side == fc2.mask_side == "input" and fc2.select is None
    assert fc1.mask.layout == (0, -1)
    # written again, it is a version-2 file of the same network
    again = bbdrop.save_compact(net, tmp_path / "v2.safetensors", template=SmallCNN())
    assert _description(again.read_bytes())["version"] == 2
    with torch.no_grad():
        loaded = bbdrop.load_compact(again, template=SmallCNN())
        torch.testing.assert_close(loaded(io["x"]), io["y"], rtol=0, atol=0)


def _edited(path: Path, change: Any) -> bytes:
    """The fixture with its description changed by ``change(description)``."""
    tensors = safetensors_torch.load(path.read_bytes())
    description = copy.deepcopy(_description(path.read_bytes()))
    change(description)
    return safetensors_torch.save(tensors, metadata={"bbdrop": json.dumps(description)})


def _children(name: str) -> Any:
    return lambda d: d["layers"][name]["children"]


def _set(name: str, value: Any) -> Any:
    return lambda d: d["layers"].__setitem__(name, value)


# (id, change, the error the first line must give)
HOSTILE_V1 = [
    ("a PrunedLayer in a PrunedLayer",
     lambda d: _children("fc1")(d).__setitem__(1, {"type": "PrunedLayer", "children": []}),
     r"field 'layers.fc1.children.1.type' must be one of \[.*\], got 'PrunedLayer'"),
    ("two masks", lambda d: _children("fc2")(d).insert(0, _children("fc2")(d)[0]),
     r"field 'layers.fc2.children' must be \[SelectFeatures, mask, layer\] \(the first two "
     r"optional\) or \[layer, mask\].*got \['DependentMask', 'DependentMask', 'Linear'\]"),
    ("a gather after the layer", lambda d: _children("fc1")(d).reverse(),
     r"field 'layers.fc1.children' must be \[SelectFeatures, mask, layer\]"),
    ("a gather in front of a batch norm",
     _set("fc2", {"type": "PrunedLayer", "children": [
         {"type": "SelectFeatures", "size": 11, "num_features": 11},
         {"type": "BatchNorm1d", "num_features": 11, "eps": 1e-5, "momentum": 0.1,
          "affine": True, "track_running_stats": True}]}),
     r"field 'layers.fc2.children' must be .*a SelectFeatures only before a Linear or Conv2d, "
     r"got \['SelectFeatures', 'BatchNorm1d'\]"),
    ("no children", _set("fc1", {"type": "PrunedLayer", "children": []}),
     r"field 'layers.fc1.children' must be a list of 1 to 4 layers, got \[\]"),
    ("a gather of another width", lambda d: _children("fc1")(d)[0].__setitem__("size", 30),
     r"field 'layers.fc1.children.0.size' must be 34, the features its Linear reads, got 30"),
    ("a negative eps", lambda d: _children("fc2")(d)[0].__setitem__("eps", -1.0),
     r"field 'layers.fc2.children.0.eps' must be a finite number in \(0, 1\), got -1.0"),
    ("a mask of 10**7 units", lambda d: _children("fc2")(d)[0].__setitem__("units", 10**7),
     r"layer 'fc2.mask' expects pi of shape \(10000000,\), the file stores \(11,\)"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "error"), [h[1:] for h in HOSTILE_V1],
                         ids=[h[0] for h in HOSTILE_V1])  # fmt: skip
def test_a_hostile_version_1_file_gets_one_line_naming_the_field(
    change: Any, error: str, tmp_path: Path
) -> None:
    path = tmp_path / "net.safetensors"
    path.write_bytes(_edited(FIXTURES / "compact-v1.safetensors", change))
    with pytest.raises(ValueError) as caught:
        bbdrop.load_compact(path, template=SmallCNN())
    line = str(caught.value)
    assert "\n" not in line and line.startswith(str(path)), line
    assert re.search(error, line), line


def test_version_1_tensors_that_collide_once_renamed_are_refused(tmp_path: Path) -> None:
    """fc1.2.weight becomes fc1.weight: a file that stores both is refused."""
    data = (FIXTURES / "compact-v1.safetensors").read_bytes()
    tensors = safetensors_torch.load(data)
    tensors["fc1.weight"] = tensors["fc1.2.weight"].clone()
    path = tmp_path / "net.safetensors"
    path.write_bytes(safetensors_torch.save(
        tensors, metadata={"bbdrop": json.dumps(_description(data))}))  # fmt: skip
    error = r"it stores two tensors for 'fc1.weight': 'fc1.2.weight' and 'fc1.weight'; write"
    with pytest.raises(ValueError, match=error):
        bbdrop.load_compact(path, template=SmallCNN())
