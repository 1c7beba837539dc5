"""The FLOP and memory accounting of the paper's tables (Lee et al., Fig. 1 and Table 1).

Everything is counted per example, from a :func:`~bbdrop.metrics.trace_layers`
description of the network, so the figures compare with Lee et al.'s Fig. 1 and
Table 1 (``speedup = FLOPs(dense) / FLOPs(pruned)``,
``memory fraction = size(pruned) / size(dense)``).

Per layer, the formulas of :mod:`bbdrop.metrics.formulas`, as in the authors'
public code (multiply-adds, bias and activation FLOPs; weights, biases, batch-norm
values and the im2col buffer as memory), and each gate's own run-time cost, asked
of the gate (``Gate.runtime_cost``): none for a static gate, whose values fold into
the neighbouring weights, and DBB's of :mod:`bbdrop.gates.costs`. The units each
layer counts come from :mod:`bbdrop.metrics.units`; this module does the
accounting over the whole network, from a layer description or from a model.

Conventions this module chooses (the paper leaves them implicit):

* An activation is counted where the trace saw one, so the logits layer has
  none (the authors' VGG code counts one there too: a difference of
  ``num_classes`` FLOPs).
* A ``(2 n - 1)`` term is clamped at 0, so a layer with every input pruned
  costs only its bias and activation.
* Conv biases are memory ("weights and biases"); the authors' code leaves them
  out (70 values of LeNet5-Caffe's 477 480). The im2col buffer can be left out
  with ``im2col=False``: the paper's LeNet5-Caffe memory column cannot include
  it (conv1's buffer alone is 3.0% of the dense total, yet SBP is reported at
  2.4%), and without it the BB row 15-33-138-64 gives 5.2% against the
  reported 5.07%.
* Pruning acts at each *boundary* between consecutive weight layers (linear or
  convolution). A gate on a convolution's output selects channels; a gate on a
  linear layer's input selects features. Between them, batch norm and max-pool
  layers work on whatever survives. When a convolution is flattened into a
  linear layer, each channel owns ``r = in_features / channels`` consecutive
  features (``r = H W``; ``r = 1`` after global pooling), and when both gates
  exist a feature is alive only if its own gate and its channel's gate are
  (LeNet5-Caffe's 50 conv2 channels and 800 fc1 inputs; VGG's conv13 and fc1).
  Conversely a channel is computed only if at least one of its features is
  alive. This is the default counting rule, ``rule="masks"``.
* Two counting rules, which differ only at a boundary with a gate on both
  sides (a convolution's output channels flattened into a gated dense input):

  - ``rule="masks"`` (default) counts what actually has to be computed: the
    intersection above. With boolean keep masks it is exact; with counts only,
    it is estimated by its upper bound: ``min(K_fc, K_conv r)`` features and
    ``min(K_conv, K_fc)`` channels.
  - ``rule="authors"`` is the rule of the authors' public code, which the
    paper's tables come from: each gated layer's kept count is taken on its
    own. The convolution computes its own gate's ``K_conv`` channels and the
    dense layer reads its own gate's ``K_fc`` features, whether or not they
    lie in pruned channels; a pruned channel does not reduce the dense layer's
    input count, nor a pruned feature the convolution's channels.

  The two agree whenever the dense gate's survivors all lie in surviving
  channels, each of which keeps at least one feature (training tends there: a
  feature of a dead channel is always zero, so the KL term prunes its gate).
  Elsewhere, one gate's count fixes both sides under either rule.
* DBB (run-time pruning): ``active`` gives a gate's running-average number of
  active units; the gated layer still computes its BB-kept units (``K``, which
  also sizes the gate's own cost), and everything downstream of the gate (batch
  norm, max-pool, the next layer's input) counts the active ones, for FLOPs and
  memory alike (the pruned counts use each layer's running-average number of
  active units). Under ``rule="authors"`` a gated layer on a two-gate boundary
  counts its own gate's active units. ``active`` only changes unit counts; what
  the gates themselves cost is given separately (``overhead``), and
  :func:`paper_costs` asks each of the model's gates for it.

The accounting covers sequential networks (each recorded layer consumes the
previous one's output, with element-wise functions, dropout, flattening or
untracked pooling in between); it raises ``ValueError`` where it can tell that
a network is not one. Average pooling, residual branches and grouped
convolutions are not covered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from bbdrop.attach import gated_layers
from bbdrop.gates.costs import CostFn
from bbdrop.metrics.formulas import (
    LayerCost,
    gate_cost,
    record_cost,
)
from bbdrop.metrics.trace import LayerRecord, trace_layers
from bbdrop.metrics.units import Boundary, Keep, UnitSpec, boundaries, flow, gate_arguments

__all__ = [
    "PaperCosts",
    "keep_masks",
    "layer_costs",
    "memory_fraction",
    "paper_costs",
    "paper_figures",
    "paper_flops",
    "paper_memory",
    "speedup",
]

# -- pruned counts over a traced network ------------------------------------------
Rule = Literal["masks", "authors"]
RULES: tuple[str, ...] = ("masks", "authors")


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")


@dataclass
class _Tally:
    """What :func:`layer_costs` gathers, by layer index: the units entering and
    leaving each layer, and the costly gate on its input or its output."""

    in_units: dict[int, float] = field(default_factory=dict)
    out_units: dict[int, float] = field(default_factory=dict)
    gates_before: dict[int, LayerCost] = field(default_factory=dict)  # on a layer's input
    gates_after: dict[int, LayerCost] = field(default_factory=dict)  # on a layer's output

    def costs(self, layers: Sequence[LayerRecord], im2col: bool) -> list[LayerCost]:
        """Every layer's cost and its gates', in execution order."""
        costs: list[LayerCost] = []
        for i, record in enumerate(layers):
            if i in self.gates_before:
                costs.append(self.gates_before[i])
            costs.append(record_cost(record, self.in_units[i], self.out_units[i], im2col))
            if i in self.gates_after:
                costs.append(self.gates_after[i])
        return costs


def layer_costs(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
    im2col: bool = True,
) -> list[LayerCost]:
    """The paper's per-example cost of every layer and costly gate, in execution order.

    Args:
        layers: the network, from :func:`~bbdrop.metrics.trace_layers`.
        units: units kept per gated layer (gate name -> count, or boolean keep
            mask of the gate's size), e.g. :func:`bbdrop.units_kept` or
            :func:`keep_masks`; layers left out keep all their units.
        active: for input-dependent (DBB) gates, the running-average number of
            active units (:func:`bbdrop.active_units`); it changes the unit
            counts downstream of the gate only, not what the gate costs.
        overhead: gate name -> the gate's own test-time cost function
            ``(kept units, (H, W) of a conv output or None) -> (FLOPs, memory)``,
            e.g. a gate's bound ``runtime_cost``. Each gate whose cost over its
            kept units is not zero adds a :class:`LayerCost` of kind ``"gate"``,
            just before its layer (a gate on the layer's input) or just after it
            (on its output).
        rule: ``"masks"`` (what is actually computed) or ``"authors"`` (each
            gated layer's own count); see the module's docstring.
        im2col: count the convolutions' im2col buffers as memory.
    """
    _check_rule(rule)
    kept, running, costly = gate_arguments(layers, units, active, overhead)
    tally = _Tally()
    for bound in boundaries(layers):
        _tally_boundary(tally, layers, bound, kept, running, costly, rule)
    return tally.costs(layers, im2col)


def _tally_boundary(
    tally: _Tally,
    layers: Sequence[LayerRecord],
    bound: Boundary,
    kept: Mapping[str, Keep],
    running: Mapping[str, float],
    costly: Mapping[str, CostFn],
    rule: Rule,
) -> None:
    """Enter the units at ``bound`` into ``tally``: those leaving its producer,
    through the layers in between, entering its consumer, and the costs of the
    gates on either side."""
    producer = None if bound.producer is None else layers[bound.producer]
    consumer = None if bound.consumer is None else layers[bound.consumer]
    # The gate on the producer's output and the one on the consumer's input, if any.
    p_gate = _gate_name(producer, "output")
    c_gate = _gate_name(consumer, "input")
    independent = rule == "authors" and p_gate is not None and c_gate is not None
    n = flow(
        bound,
        kept.get(p_gate),
        kept.get(c_gate),
        running.get(p_gate, math.inf),
        running.get(c_gate, math.inf),
        independent,
    )
    if producer is not None and bound.producer is not None:
        tally.out_units[bound.producer] = n.coarse_keep
        if p_gate in costly:
            cost = gate_cost(p_gate, costly[p_gate], n.coarse_keep, producer.out_shape)
            if cost is not None:
                tally.gates_after[bound.producer] = cost
    for i in bound.segment:
        coarse_level = len(layers[i].in_shape) == bound.coarse_rank
        tally.in_units[i] = tally.out_units[i] = (
            n.coarse_active if coarse_level else n.fine_reaching
        )
    if consumer is not None and bound.consumer is not None:
        tally.in_units[bound.consumer] = n.fine_active
        if c_gate in costly:
            cost = gate_cost(c_gate, costly[c_gate], n.fine_keep, consumer.in_shape)
            if cost is not None:
                tally.gates_before[bound.consumer] = cost


def _gate_name(record: LayerRecord | None, side: str) -> str | None:
    """The layer's name if it takes its gate on ``side``; None otherwise (never a dict key)."""
    return record.name if record is not None and record.gate_side == side else None


def paper_flops(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
) -> float:
    """Per-example FLOPs in the paper's accounting (dense when ``units`` is None)."""
    costs = layer_costs(layers, units, active, overhead=overhead, rule=rule)
    return sum(c.flops for c in costs)


def paper_memory(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
    im2col: bool = True,
) -> float:
    """Values to store in the paper's accounting (dense when ``units`` is None)."""
    costs = layer_costs(layers, units, active, overhead=overhead, rule=rule, im2col=im2col)
    return sum(c.memory for c in costs)


def speedup(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
) -> float:
    """``FLOPs(dense) / FLOPs(pruned)``; the dense network has no gates."""
    pruned = paper_flops(layers, units, active, overhead=overhead, rule=rule)
    return paper_flops(layers) / pruned if pruned > 0 else math.inf


def memory_fraction(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
    im2col: bool = True,
) -> float:
    """``size(pruned) / size(dense)`` (the paper's "memory", as a fraction)."""
    pruned = paper_memory(layers, units, active, overhead=overhead, rule=rule, im2col=im2col)
    return pruned / paper_memory(layers, im2col=im2col)


# -- the same, from a model --------------------------------------------------------
@dataclass(frozen=True)
class PaperCosts:
    """The paper's figures for one network: pruned and full FLOPs and memory."""

    flops: float
    memory: float
    full_flops: float
    full_memory: float
    layers: tuple[LayerCost, ...]

    @property
    def speedup(self) -> float:
        """``FLOPs(dense) / FLOPs(pruned)``."""
        return self.full_flops / self.flops if self.flops > 0 else math.inf

    @property
    def memory_fraction(self) -> float:
        """``size(pruned) / size(dense)``."""
        return self.memory / self.full_memory


def keep_masks(model: nn.Module) -> dict[str, Tensor]:
    """Boolean keep mask of every gate of ``model`` (gate name -> (K,) mask)."""
    return {name: g.gate.keep_mask() for name, g in gated_layers(model)}


def _gate_overheads(model: nn.Module) -> dict[str, CostFn]:
    """Each gate's own test-time cost function (gate name -> its ``runtime_cost``)."""
    return {name: g.gate.runtime_cost for name, g in gated_layers(model)}


def _costs_of(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec],
    active: Mapping[str, float] | None,
    overhead: Mapping[str, CostFn],
    rule: Rule,
    im2col: bool,
) -> PaperCosts:
    pruned = layer_costs(layers, units, active, overhead=overhead, rule=rule, im2col=im2col)
    full = layer_costs(layers, im2col=im2col)
    return PaperCosts(
        flops=sum(c.flops for c in pruned),
        memory=sum(c.memory for c in pruned),
        full_flops=sum(c.flops for c in full),
        full_memory=sum(c.memory for c in full),
        layers=tuple(pruned),
    )


def paper_costs(
    model: nn.Module,
    example_input: Tensor,
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    rule: Rule = "masks",
    im2col: bool = True,
) -> PaperCosts:
    """Trace ``model`` on ``example_input`` and count the paper's figures.

    ``units`` defaults to the keep masks of the model's gates (none: the dense
    network). Every gate's own test-time cost (``Gate.runtime_cost``, nothing
    for a static gate) is counted over its kept units. Pass
    ``active=bbdrop.active_units(model)`` after an evaluation pass to count
    DBB's run-time pruning. ``rule`` picks the counting rule (module docstring).
    """
    _check_rule(rule)
    layers = trace_layers(model, example_input)
    if units is None:
        units = keep_masks(model)
    return _costs_of(layers, units, active, _gate_overheads(model), rule, im2col)


def paper_figures(
    model: nn.Module, example_input: Tensor, active: Mapping[str, float] | None = None
) -> dict[str, float]:
    """The paper's figures for ``model`` under both counting rules, as one flat dict.

    The pruned network is that of the gates' keep masks, with each gate's own
    test-time cost and, given ``active`` (:func:`bbdrop.active_units`), DBB's
    run-time pruning, as in :func:`paper_costs`. Keys (``*_authors``: the
    authors' count rule, the others the keep-mask rule; see the module docstring):

    * ``speedup``, ``speedup_authors``: ``FLOPs(dense) / FLOPs(pruned)``;
    * ``memory``, ``memory_authors``: ``size(pruned) / size(dense)`` with the
      convolutions' im2col buffers;
    * ``memory_params``, ``memory_params_authors``: the same without them
      (``im2col=False``): weights, biases, batch-norm and gate values only;
    * ``flops``: pruned FLOPs per example (keep-mask rule); ``flops_dense``:
      the dense network's.
    """
    layers = trace_layers(model, example_input)
    units = keep_masks(model)
    overhead = _gate_overheads(model)

    def costs(rule: Rule, im2col: bool) -> PaperCosts:
        return _costs_of(layers, units, active, overhead, rule, im2col)

    masks, authors = costs("masks", True), costs("authors", True)
    return {
        "speedup": masks.speedup,
        "speedup_authors": authors.speedup,
        "memory": masks.memory_fraction,
        "memory_authors": authors.memory_fraction,
        "memory_params": costs("masks", False).memory_fraction,
        "memory_params_authors": costs("authors", False).memory_fraction,
        "flops": masks.flops,
        "flops_dense": masks.full_flops,
    }
