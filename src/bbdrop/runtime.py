"""Run-time pruning of DBB, executed: each layer reads only the units DBB switched on
(docs/compact.md, section "Run-time DBB").

The paper counts DBB's FLOPs per example over the units its input switches on; a
compacted network (:func:`bbdrop.compact`) still multiplies the switched-off
units by zero. :func:`runtime_pruned` wraps every layer whose input comes from an
input-dependent gate's test-time mask (a :class:`~bbdrop.gates.TestTimeMask`: DBB's
:class:`~bbdrop.compaction.DependentMask`) through operations that keep zeros zero
(ReLU, max-pooling, flatten, the gather of kept features) in
:class:`SkipZeroInputs`, which finds the input features (or channels) that are
non-zero in some example of the batch and computes the layer from those alone.
At batch 1 these are the units that example switched on; for a batch, their
union; when the union is nearly everything, the layer runs whole. What ran beside
the layer (its gather, its mask: :mod:`bbdrop.compaction.attached`) runs beside the
:class:`SkipZeroInputs` that takes its place.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from bbdrop.compaction import SelectFeatures, set_submodule
from bbdrop.compaction.attached import attach_beside_, beside, detach_beside_
from bbdrop.gates.base import TestTimeMask

__all__ = ["DENSE_ABOVE", "SkipZeroInputs", "runtime_pruned"]

# The fraction of a layer's inputs in use above which gathering them costs more than
# it saves, so the layer runs whole (benchmarks/inference.py measured the crossover).
DENSE_ABOVE = 0.9
# Modules after which a unit that was zero is still zero (and which keep the units
# where they are, or gather them: the input of the next layer is the same units).
_ZERO_PRESERVING = (nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, SelectFeatures)


class SkipZeroInputs(nn.Module):
    """``layer(x)`` from the input features (dense) or channels (convolution) that are
    non-zero in some example of ``x``; a zero input contributes nothing, so the result
    is the layer's, up to the order of the sums.

    Args:
        layer: ``nn.Linear``, or ``nn.Conv2d`` without groups. What runs beside it (a
            compacted layer's gather and mask) moves onto this module, in place,
            and runs around the skipping, as it ran around the layer.
        dense_above: run the layer whole when at least this fraction of its inputs
            is in use.
    """

    def __init__(self, layer: nn.Module, dense_above: float = DENSE_ABOVE) -> None:
        super().__init__()
        if type(layer) not in (nn.Linear, nn.Conv2d) or getattr(layer, "groups", 1) != 1:
            raise ValueError(
                f"SkipZeroInputs takes nn.Linear or nn.Conv2d without groups, got {layer}"
            )
        self.layer = layer
        attach_beside_(self, detach_beside_(layer))
        self.dense_above = float(dense_above)
        if isinstance(layer, nn.Linear):  # one row per input feature: a contiguous gather
            # (a copy made for inference, not saved: it follows the weight as it is now)
            weight_t = layer.weight.detach().t().contiguous()
            self.register_buffer("weight_t", weight_t, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        # non-zero anywhere in the batch: the largest magnitude is (a NaN stays in use);
        # 7x faster than ne(0).any() over the batch, which reduces booleans across rows
        if isinstance(layer, nn.Linear):  # features: the last dimension
            used = x.abs().reshape(-1, x.shape[-1]).amax(0).ne(0)
        else:
            used = x.abs().amax(dim=(0, 2, 3)).ne(0)
        index = used.nonzero().flatten()
        if index.numel() >= self.dense_above * used.numel():
            return layer(x)
        if isinstance(layer, nn.Linear):
            out = x.index_select(-1, index) @ self.weight_t.index_select(0, index)
            return out if layer.bias is None else out + layer.bias
        # the layer's own padding mode: a zero channel stays zero under any of them
        return layer._conv_forward(x.index_select(1, index), layer.weight.index_select(1, index),
                                   layer.bias)  # fmt: skip

    def extra_repr(self) -> str:
        return f"dense_above={self.dense_above}"


@torch.no_grad()
def runtime_pruned(
    model: nn.Module, example: Tensor, dense_above: float = DENSE_ABOVE
) -> nn.Module:
    """A copy of the compacted DBB network ``model`` (or that of another input-dependent
    method) whose layers skip the units its test-time masks switched off
    (:class:`SkipZeroInputs`), in eval mode.

    ``example``, an input batch, is run once to find the order of the layers. The
    network must be a chain (each layer reads the previous one's output, as in the
    paper's networks); elsewhere use ``model`` itself.

    Raises:
        ValueError: ``model`` has no DBB mask (compact a DBB network first), or is
            not a chain of layers.
    """
    net = copy.deepcopy(model).eval()
    if not any(isinstance(m, TestTimeMask) for m in net.modules()):
        raise ValueError(
            "the network has no DBB mask to skip by; give bbdrop.compact() a network with "
            "DBB gates (for BB and the other methods, the compacted network is the fast one)"
        )
    masked, previous = False, example
    for name, module, x, out in _steps(net, example):
        if x is not previous:
            raise ValueError(
                f"{name!r} does not read the output of the layer before it: run-time pruning "
                "takes a chain of layers (as the paper's networks are); use the compacted "
                "network"
            )
        previous = out
        if isinstance(module, TestTimeMask):
            masked = True
        elif type(module) in (nn.Linear, nn.Conv2d):
            if masked and getattr(module, "groups", 1) == 1:
                set_submodule(net, name, SkipZeroInputs(module, dense_above))
            masked = False
        elif not isinstance(module, _ZERO_PRESERVING):
            masked = False  # batch norm and the like turn a zero into something else
    return net


def _steps(net: nn.Module, example: Tensor) -> list[tuple[str, nn.Module, Tensor, Tensor]]:
    """(name, module, input, output) of each step of ``net`` on ``example``, in the order
    they ran: the modules without children but what runs beside them (a compacted
    layer's gather and mask are steps of their own, before or after the layer's)."""
    steps: list[tuple[str, nn.Module, Tensor, Tensor]] = []

    def record(name: str):
        return lambda m, args, out: steps.append((name, m, args[0], out))

    # first among the hooks: a layer's own output, before a mask on it is applied
    hooks = [m.register_forward_hook(record(n), prepend=True)
             for n, m in net.named_modules()
             if {c for c, _ in m.named_children()} <= set(beside(m).children())]  # fmt: skip
    try:
        net(example)
    finally:
        for h in hooks:
            h.remove()
    return steps
