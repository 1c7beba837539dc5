"""What runs beside a compacted layer (:mod:`bbdrop.compaction.attached`): a gather of the
input features it still reads (:class:`SelectFeatures`, the child ``select``), where
they cannot go as whole channels, and an input-dependent gate's test-time mask on its
kept units (:meth:`Gate.to_module`, a :class:`TestTimeMask`, the child ``mask``)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from bbdrop.attach import PLACEMENTS
from bbdrop.compaction.attached import Beside, attach_beside_, beside
from bbdrop.compaction.folding import Tracked
from bbdrop.compaction.modules import SelectFeatures
from bbdrop.gates.base import TestTimeMask


def gather_read_features(
    input_gated: list[nn.Module], tracked: dict[nn.Module, Tracked], round_to: int
) -> None:
    """Put a gather of the features it reads in front of each layer gated on its input
    that gives some of them zero weight (:func:`_select_read_features`)."""
    for layer in input_gated:
        _select_read_features(layer, tracked.get(layer), round_to)


def put_back_masks(tracked: dict[nn.Module, Tracked]) -> None:
    """Put each input-dependent gate's test-time mask, on its kept units, beside its layer."""
    for layer, t in tracked.items():
        _regate(layer, t)


def _select_read_features(layer: nn.Module, tracked: Tracked | None, round_to: int) -> None:
    """Drop the input features ``layer`` gives zero weight (that stay because the
    channel they come from is read elsewhere, or because they are the network's
    input), gathering the rest in front of it: a multiple of ``round_to`` of them,
    or all (then nothing is gathered)."""
    w = layer.weight.detach()
    if getattr(layer, "groups", 1) != 1 or (tracked is not None and tracked.gate.unit_size > 1):
        return  # weights per group of channels; a mask over heads (features come by heads)
    read = w.transpose(0, 1).flatten(1).ne(0).any(1)
    used = int(read.sum())
    extra = -(-used // round_to) * round_to - used
    if extra > 0:  # keep the first few unread features too
        read[torch.nonzero(~read).flatten()[:extra]] = True
    if bool(read.all()) or not bool(read.any()):
        return
    index = torch.nonzero(read).flatten()
    layer.weight = nn.Parameter(w[:, index].clone())
    PLACEMENTS[type(layer)].set_width(layer, "input", index.numel())
    if tracked is not None and tracked.side == "input":
        tracked.alive = [tracked.alive[i] for i in index.tolist()]
    dim = -1 if isinstance(layer, nn.Linear) else 1
    attach_beside_(layer, Beside(select=SelectFeatures(index.to(w.device), w.shape[1], dim)))


def _regate(layer: nn.Module, t: Tracked) -> None:
    """Put ``t``'s input-dependent mask, on its alive units, beside ``layer`` (after its
    gather, if it reads its input through one)."""
    mask = t.gate.to_module(t.alive)
    if not isinstance(mask, TestTimeMask):
        raise TypeError(
            f"{type(t.gate).__name__} is input dependent, so its to_module() must return its "
            f"test-time mask (a bbdrop.gates.TestTimeMask), got {type(mask).__name__}"
        )
    attach_beside_(layer, replace(beside(layer), mask=mask, mask_side=t.side))
