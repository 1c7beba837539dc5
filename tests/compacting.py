"""Checks shared by the tests that compact a gated network: the compacted network
computes what the gated one does (relative to its largest output), warns of nothing,
and runs the same in onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.compaction import without_gates

TOLERANCE = 1e-5  # relative to the largest logit


def check_compacted(net: nn.Module, x: torch.Tensor, *, smaller: bool = True) -> nn.Module:
    """``bbdrop.compact(net, x)``, checked: no warning (no inexact removal, not even a
    warned one), outputs within TOLERANCE of ``net``'s in evaluation, and, with
    ``smaller``, fewer parameters than the dense network."""
    net.eval()
    with torch.no_grad():
        reference = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = bbdrop.compact(net, x)
    with torch.no_grad():
        out = small(x)
    scale = max(1.0, float(reference.abs().max()))
    assert float((out - reference).abs().max()) <= TOLERANCE * scale
    if smaller:
        dense = sum(p.numel() for p in without_gates(net).parameters())
        assert sum(p.numel() for p in small.parameters()) < dense
    return small


def check_onnx(small: nn.Module, x: torch.Tensor, path: Path) -> None:
    """``small`` exported to ONNX (traced on two examples) gives its outputs on all of
    ``x`` in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    bbdrop.export_onnx(small, x[:2], path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), small(x), rtol=1e-4, atol=1e-5)
