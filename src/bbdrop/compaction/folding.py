"""Folding each gate's test-time values into its layer's weights, leaving plain
layers; a DBB gate's input-dependent part is tracked to be put back on the kept units."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from bbdrop.attach import GatedLayer, gated_layers
from bbdrop.compaction.submodule import set_submodule
from bbdrop.gates.base import Gate, scale_units


@dataclass
class Tracked:
    """Original unit indices still present on one side of a layer that carries a
    dynamic (DBB) gate, so that the gate can be cut to the same units."""

    gate: Gate
    side: str
    alive: list[int] = field(default_factory=list)


def fold_gates(net: nn.Module) -> tuple[list[nn.Module], dict[nn.Module, Tracked]]:
    """Replace, in place, each gated layer of ``net`` by its plain layer with the gate
    folded in (:func:`folded_layer`). Returns the plain layers gated on their input,
    and the DBB gates to put back (:class:`Tracked`, by plain layer)."""
    input_gated: list[nn.Module] = []
    tracked: dict[nn.Module, Tracked] = {}
    for name, g in list(gated_layers(net)):
        plain = folded_layer(g)
        set_submodule(net, name, plain)
        if g.gate.input_dependent:  # kept as a gate on the kept units
            units = g.layer.weight.shape[1 if g.side == "input" else 0]
            tracked[plain] = Tracked(g.gate, g.side, list(range(units)))
        if g.side == "input":
            input_gated.append(plain)
    return input_gated, tracked


def folded_layer(g: GatedLayer) -> nn.Module:
    """A copy of ``g``'s layer with the gate's test-time values folded in; for a dynamic
    gate only its static part (the units it prunes for every input)."""
    plain = copy.deepcopy(g.layer)
    if not g.gate.input_dependent:
        weight, bias = g.gate.fold(g.layer, g.side)
    else:
        weight, bias = scale_units(g.layer, g.side, g.gate.keep_mask())
    plain.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().clone())
    return plain
