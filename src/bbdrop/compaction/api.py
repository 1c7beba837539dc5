"""The entry points: :func:`compact` (its steps in the other modules of the package),
:func:`inference_parameters` and :func:`without_gates`."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from bbdrop.attach import gated_layers, remove_gate_
from bbdrop.compaction.checks import check_input, reference_output
from bbdrop.compaction.folding import fold_gates, share_masks
from bbdrop.compaction.gathers import gather_read_features, put_back_masks
from bbdrop.compaction.groups import remove_gated_heads, remove_group_units, remove_units
from bbdrop.compaction.verify import verify
from bbdrop.gates.base import TestTimeMask
from bbdrop.heads import release_nested_, unroute_heads_


@torch.no_grad()
def compact(
    model: nn.Module, example: Tensor, *, round_to: int = 1, check: bool = True
) -> nn.Module:
    """The smaller network that ``model`` (with bbdrop gates) computes in evaluation.

    Args:
        model: a network with gates (:func:`bbdrop.attach_gates_`), trained; it is
            not changed.
        example: an input batch of the model (a few examples suffice); it is traced
            to find which channels are coupled, and the result is checked on it.
        round_to: keep a multiple of this many units (channels) in each set of
            coupled layers, or all of them: a few pruned units stay, computing the
            zeros they compute in ``model``. Matrix products run faster at some
            widths than at others (docs/compact.md, "Widths").
        check: compare the result's output with ``model``'s on ``example`` (and warn
            where a removal was inexact); False skips it, where compaction runs many
            times on the same network (a FLOP budget's search, :mod:`bbdrop.budget`).

    Returns:
        A copy of ``model`` in eval mode without gates, with ``model``'s module tree:
        each gated layer is the plain layer at its place (``nn.Linear``, ``nn.Conv2d``,
        a batch norm), of the kept widths, batch norms cut to the same channels. What runs beside a
        layer is its child, applied by a hook (:mod:`bbdrop.compaction.attached`):
        ``layer.select``, a :class:`SelectFeatures`, where it reads a subset of its
        input; ``layer.mask``, where an input-dependent gate leaves its test-time mask
        (:meth:`bbdrop.Gate.to_module`; DBB's :class:`DependentMask`) on its kept
        units, on the side the gate was on.

    Raises:
        ValueError: no gates; a gated layer that keeps no unit; a layer type whose
            channels cannot be removed exactly (named).
    """
    check_input(model, example, round_to)
    reference = reference_output(model, example) if check else None
    net = copy.deepcopy(model).eval()
    folded = fold_gates(net)
    tracked = folded.tracked
    names = {m: n for n, m in net.named_modules()}
    remove_gated_heads(net, folded.heads, tracked)
    remove_group_units(net, example, folded.groups, tracked, round_to)
    corrections = remove_units(net, example, tracked, names, round_to)
    gather_read_features(folded.input_gated, tracked, round_to)
    put_back_masks(tracked)
    share_masks(tracked)
    release_nested_(net)  # a transformer stack with nothing beside its layers packs again
    if reference is not None:
        verify(net, example, reference, corrections, names)
    return net


def inference_parameters(model: nn.Module) -> int:
    """The values a compacted network computes with: its parameters and the values of
    its test-time masks (buffers; DBB's), not the indices of its gathers."""
    masks = [m for m in model.modules() if isinstance(m, TestTimeMask)]
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for m in masks for b in m.buffers()
    )


def without_gates(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the gates taken off its layers, which are unchanged:
    the dense network the gates sit on, in eval mode."""
    net = copy.deepcopy(model).eval()
    for _, g in list(gated_layers(net)):
        remove_gate_(g)
    for module in net.modules():  # PyTorch's attention back to its fused call
        unroute_heads_(module)
    release_nested_(net)
    return net
