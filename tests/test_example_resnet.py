"""examples/resnet_fashion.py runs end to end at its smallest settings: a tiny ResNet on
synthetic images, each method gated, trained, compacted and timed, and its table printed.

The settings are the example's own flags, turned so that a few dozen steps prune: a high
learning rate for the gates and a tolerance that lets the rule take the smallest network.
The sizes and errors mean nothing here; what is checked is that the script works as a user
runs it, and that every compacted network it reports, DBB's included, is smaller than the
dense one.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import bbdrop

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resnet_fashion.py"
TINY = [
    "--synthetic", "--width", "4", "--blocks", "1", "--train-size", "256", "--val-size", "64",
    "--test-size", "64", "--batch", "32", "--epochs-dense", "3", "--epochs", "4",
    "--epochs-dbb", "1", "--lr", "1e-2", "--gate-lr", "0.5", "--kl-scale", "3",
    "--tolerance", "100", "--rounds", "1",
]  # fmt: skip


def load_example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("resnet_fashion", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_example_prints_each_method_and_compacts_it_smaller(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example(monkeypatch)
    threads = torch.get_num_threads()
    try:
        rows = example.main(TINY)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert [r.method for r in rows] == ["dense", "bb", "dbb", "vib"]
    for method in ("dense", "bb", "dbb", "vib"):
        assert re.search(rf"^{method} +\d", out, re.M), f"no table row for {method}:\n{out}"
    dense = rows[0]
    assert dense.speedup == 1.0 and 0 <= dense.test_error <= 100
    for row in rows[1:]:  # each compacted: bbdrop.compact raises where it cannot
        assert row.parameters < dense.parameters, (row.method, row.parameters, dense.parameters)
        assert row.flops < dense.flops, (row.method, row.flops, dense.flops)
        assert row.expected_flops <= row.flops, row.method
        assert row.speedup > 0, row.method  # timed
        assert 0 <= row.val_error <= 100 and 0 <= row.test_error <= 100, row.method
        assert not list(bbdrop.gated_layers(row.network)), row.method  # a plain network
    dbb = rows[2]
    assert "(" in next(iter(dbb.kept.values())), dbb.kept  # DBB's units on per example


def test_the_selection_rule_takes_the_fewest_flops_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    example = load_example(monkeypatch)
    net = torch.nn.Linear(1, 1)

    def point(val_error: float, flops: float) -> object:
        return example.Checkpoint({}, 1, val_error, flops, net)

    a, b, c = point(10.0, 50.0), point(12.0, 20.0), point(11.0, 20.0)
    assert example.choose([a, b, c], bound=12.0) is c  # fewest FLOPs, tie: lower error
    assert example.choose([a, b, c], bound=10.5) is a
    assert example.choose([b, c], bound=5.0) is c  # none within: the lowest error
