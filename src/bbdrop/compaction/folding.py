"""Folding each gate's test-time values into its layer's weights, leaving plain
layers; a DBB gate's input-dependent part is tracked to be put back on the kept units."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from bbdrop.attach import gated_layers, remove_gate_
from bbdrop.compaction.attached import share_mask_
from bbdrop.gates.base import Gate, scale_units
from bbdrop.heads import AttentionHeads


@dataclass
class Tracked:
    """Original unit indices still present on one side of a layer that carries a
    dynamic (DBB) gate, so that the gate can be cut to the same units."""

    gate: Gate
    side: str
    alive: list[int] = field(default_factory=list)
    # the further modules of the gate's coupled group, which apply its mask too
    shared: list[nn.Module] = field(default_factory=list)


@dataclass
class Folded:
    """What :func:`fold_gates` leaves to the next steps of compaction."""

    # the plain layers that were gated on their input
    input_gated: list[nn.Module] = field(default_factory=list)
    # the input-dependent gates to put back, by plain layer
    tracked: dict[nn.Module, Tracked] = field(default_factory=dict)
    # the units to remove from each coupled group that has a gate, by the name of the
    # group's root layer (:attr:`bbdrop.Gate.group_root`)
    groups: dict[str, list[int]] = field(default_factory=dict)
    # the attentions whose heads had gates, with the heads to keep (bbdrop.heads)
    heads: list[tuple[AttentionHeads, Tensor]] = field(default_factory=list)


def fold_gates(net: nn.Module) -> Folded:
    """Turn, in place, each gated layer of ``net`` into its plain layer with the gate
    folded in (:func:`fold_layer_`), and say what is left to do (:class:`Folded`)."""
    folded = Folded()
    input_gated, tracked, groups = folded.input_gated, folded.tracked, folded.groups
    for _, layer in list(gated_layers(net)):
        gate, side, shared = layer.gate, layer.gate.bound_side(), list(layer.gate.shared_with)
        if gate.group_root is not None:
            groups[gate.group_root] = (~gate.keep_mask()).nonzero().flatten().tolist()
        if gate.heads is not None:
            folded.heads.append((gate.heads, gate.keep_mask()))
        for module in gate.shared_with:  # the further modules of its group
            _fold_values(module, gate)
        fold_layer_(layer)
        if gate.input_dependent:  # kept as a gate on the kept units
            units = layer.weight.shape[1 if side == "input" else 0] // gate.unit_size
            tracked[layer] = Tracked(gate, side, list(range(units)), shared)
        if side == "input":
            input_gated.append(layer)
    return folded


def share_masks(tracked: dict[nn.Module, Tracked]) -> None:
    """Give each input-dependent mask of a coupled group's gate (on the group's first
    module, put back by :func:`~bbdrop.compaction.gathers.put_back_masks`) to the
    group's further modules, which multiply their outputs by the mask it drew in the
    same pass, as the gate's did (:func:`~bbdrop.compaction.attached.share_mask_`)."""
    for layer, t in tracked.items():
        for module in t.shared:
            share_mask_(module, layer.mask)


def _fold_values(module: nn.Module, gate: Gate) -> None:
    """Multiply ``module``'s output units (weight rows and bias; a batch norm's scale and
    shift) by ``gate``'s test-time values, in place: the gate's values for a static
    gate, the units it keeps for an input-dependent one."""
    values = gate.keep_mask() if gate.input_dependent else gate.gate_values()
    weight, bias = scale_units(module, "output", values.to(module.weight.dtype))
    module.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone())


def fold_layer_(layer: nn.Module) -> nn.Module:
    """Take the gate off ``layer``, in place, with its test-time values folded into the
    weights; for an input-dependent gate only its static part (the units it prunes
    for every input)."""
    gate, side = layer.gate, layer.gate.bound_side()
    if not gate.input_dependent:
        weight, bias = gate.fold(layer, side)
    else:
        weight, bias = scale_units(layer, side, gate.per_feature(gate.keep_mask()))
    remove_gate_(layer)
    layer.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone())
    return layer
