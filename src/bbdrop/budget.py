"""A FLOP budget that is hit: the network pruned along a path from its dense cost to a
target fraction of its FLOPs, the gates' own regularisation steered to follow it.

Every method's strength is one number, ``kl_scale`` (the weight of its KL or penalty
in ``CE + kl_scale * KL / N``); the FLOPs it ends at rise and fall with it, but how
far is a property of the method, the network and the data (on LeNet-500-300 a 100x
range of scales gives 2.3x to 42x), and a method's pruning lags its scale by epochs,
then comes in a rush: steering the scale alone overshoots (measured: a target of
1/8 ended at 1/17). :class:`BudgetController` therefore does two things after each
epoch of a stage:

1. **Follow a path.** The path goes from the dense cost to the target, the same
   ratio per epoch, reaching it after ``ramp`` of the stage's epochs. When the cost
   of the network the gates give now (:func:`cost_fraction`: the compacted network's
   FLOPs) stands above the path, the units the method ranks lowest
   (:meth:`bbdrop.Gate.keep_scores`, the quantity its own pruning rule thresholds)
   are removed, across all gates, until it does not (:func:`settle_`).
2. **Steer the method.** Every gate's ``kl_scale`` is multiplied by
   ``(cost / path) ** gain`` (at most 4x either way per epoch), so that the method's
   own pruning carries the path as far as it can: the more of the pruning the
   posterior does itself, the lower the error (measured, docs/sparsify.md).

Once the path reaches the target, or the cost does, the gates' parameters are frozen:
the units kept stay kept, and the rest of the stage trains the weights. A method's own
pruning can fall by a fifth of the cost in one epoch (BB at 1/16 of LeNet-500-300,
steered hard by then, went from 0.069 to 0.054 in its last epoch before the freeze),
so once an epoch ends within :data:`GUARD` times the target, the cost is also
measured :data:`CHECKS` times during each epoch, and the gates freeze at the first
measurement at or below the target. A unit is never added back, so a network whose
own pruning went below the target stays there (reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.attach import gated_layers
from bbdrop.config import OptimConfig

__all__ = [
    "CHECKS", "DBB_HEADROOM", "GUARD", "BudgetController", "after_the_path", "check_budget",
    "cost_fraction", "settle_", "smallest_cost", "stage_goals",
]  # fmt: skip

MAX_FACTOR = 4.0  # the largest change of the scales per epoch, either way
# The path reaches the target after this fraction of the stage's epochs; the scales
# move by (cost / path) ** GAIN per epoch. Chosen on held-out training data
# (docs/sparsify.md, "How the budget's settings were chosen").
RAMP, GAIN = 0.6, 1.5
# DBB: the BB stage is brought to this multiple of the budget, and the DBB stage's
# run-time skipping steered down to the budget. DBB at its reference weight made
# the BB network it started from 1.4x cheaper on LeNet-500-300 (validation sweeps:
# 3.84x -> 5.36x, docs/baselines.md).
DBB_HEADROOM = 1.4
# After an epoch that ends within GUARD times the target, the cost is also measured
# CHECKS times per epoch (every 25 steps until an epoch has been counted), and the gates
# freeze when it is at or below the target: a guarded epoch can overshoot by a
# CHECKS-th of its pruning, not by all of it.
GUARD, CHECKS, FIRST_EVERY = 2.0, 16, 25


def stage_goals(budget: float, stages: Sequence[str]) -> dict[str, tuple[float, float]]:
    """(start, goal) of the cost for each gated training stage of a run, in order: the
    last ends at ``budget``; a BB stage before a DBB stage ends at ``budget`` times
    :data:`DBB_HEADROOM` (at most dense), and DBB's skipping brings it down from there."""
    goals, start = {}, 1.0
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        goal = budget if last else min(1.0, budget * DBB_HEADROOM)
        goals[stage], start = (start, goal), goal
    return goals


def after_the_path(optim: OptimConfig) -> OptimConfig:
    """``optim`` with its step decay moved into the part of the stage after the path has
    reached the target: a milestone m (a fraction of the stage's epochs) becomes
    RAMP + (1 - RAMP) m. The weights then learn at the full rate while units are being
    removed, and the network the budget leaves adapts to its last removals before the
    rate falls (with the decay at its usual place, a short stage met its last removals
    at a hundredth of the rate: docs/sparsify.md, "Tutorial")."""
    return replace(optim, milestones=tuple(RAMP + (1 - RAMP) * m for m in optim.milestones))


def cost_fraction(model: nn.Module, example: Tensor, data: Tensor | None = None) -> float:
    """The FLOPs of the network ``model``'s gates give, as a fraction of the dense
    network's: the compacted network's, with run-time skipping for DBB
    (:func:`bbdrop.network_costs`)."""
    from bbdrop.compaction import compact
    from bbdrop.metrics import network_costs

    small = compact(model, example, check=False)  # the search compacts many times
    costs = network_costs(model, example, data, compacted=small)
    return costs.expected_flops / costs.dense_flops


@dataclass
class BudgetController:
    """Steers ``model``'s gates toward ``target`` (a fraction of the dense FLOPs) over a
    stage (module docstring); a :class:`bbdrop.train.loop.Controller`."""

    model: nn.Module
    target: float
    example: Tensor
    data: Tensor | None = None
    ramp: float = RAMP
    gain: float = GAIN
    start: float = 1.0  # the cost the path starts from (the dense network's)
    log_scale: float = 0.0  # log of the factor on every gate's starting kl_scale
    frozen: bool = False  # the gates' parameters, once the target is reached
    trace: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0  # the optimiser steps of an epoch, once one has been counted
    _step: int = field(default=0, init=False, repr=False)
    _frozen_at: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        validate.in_range("target", self.target, 0.0, 1.0, (False, True))
        self._base = {name: layer.gate.kl_scale for name, layer in gated_layers(self.model)}

    def path(self, epoch: int, epochs: int) -> float:
        """Where the cost should stand after ``epoch`` of ``epochs``: from ``start`` to
        the target, the same ratio per epoch, then the target."""
        done = min(1.0, epoch / max(1e-9, self.ramp * epochs))
        return self.start * (self.target / self.start) ** done

    def guarding(self) -> bool:
        """Whether the cost is measured during epochs: the gates still learn, and the
        last epoch ended (or the stage starts) within :data:`GUARD` times the target."""
        last = self.trace[-1]["cost"] if self.trace else self.start
        return not self.frozen and last <= GUARD * self.target

    def after_step(self, model: nn.Module, step: int) -> None:
        self._step = step
        every = max(1, self.steps // CHECKS) if self.steps else FIRST_EVERY
        if step % every or not self.guarding():
            return
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # no draw, no statistics
            model.eval()
            try:
                cost = cost_fraction(model, self.example, self.data)
            finally:
                model.train()
        if cost <= self.target:
            self.frozen, self._frozen_at = True, step
            self._apply()

    def after_epoch(self, model: nn.Module, record: Any, epochs: int) -> None:
        self.steps, self._step = self._step or self.steps, 0
        cost = cost_fraction(model, self.example, self.data)
        goal = self.path(record.epoch, epochs)
        removed = settle_(model, goal, self.example, self.data, cost=cost) if cost > goal else 0
        entry = {"epoch": record.epoch, "cost": cost, "path": goal, "removed": removed}
        if self._frozen_at is not None:  # the target was reached during the epoch
            entry["frozen_at_step"], self._frozen_at = self._frozen_at, None
        elif not self.frozen:
            step = self.gain * (math.log(max(cost, 1e-12)) - math.log(goal))
            self.log_scale += max(-math.log(MAX_FACTOR), min(math.log(MAX_FACTOR), step))
            # the path at the target, or the cost: the gates stay as they are
            self.frozen = goal <= self.target or cost <= self.target
        self.trace.append({**entry, "scale": math.exp(self.log_scale)})
        self._apply()

    def _apply(self) -> None:
        for name, layer in gated_layers(self.model):
            layer.gate.kl_scale = self._base[name] * math.exp(self.log_scale)
            if self.frozen and type(layer.gate).needs_bound_layer:
                # SSL's and SVD's values are their layer's weights, which go on training:
                # their regulariser would go on pruning below the target (SSL on
                # LeNet-500-300 fell from 0.249 to 0.054 after the freeze; docs/sparsify.md)
                layer.gate.kl_scale = 0.0
            if self.frozen:
                for p in layer.gate.parameters():
                    p.requires_grad_(False)
                    p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"log_scale": self.log_scale, "frozen": self.frozen, "trace": list(self.trace),
                "steps": self.steps}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_scale = float(state.get("log_scale", 0.0))
        self.steps = int(state.get("steps", 0))
        self.trace = list(state.get("trace", []))
        self.frozen = bool(state.get("frozen", False))
        self._apply()


@torch.no_grad()
def smallest_cost(model: nn.Module, example: Tensor) -> float:
    """The cost (:func:`cost_fraction`) with one unit left per gate: no budget below it
    can be met. ``model`` is left as it was."""
    gates = [layer.gate for _, layer in gated_layers(model)]
    saved = [g.static_keep.clone() for g in gates]
    try:
        for g in gates:
            g.static_keep.zero_()
            g.static_keep[int(g.keep_scores().argmax())] = True
        return cost_fraction(model, example)
    finally:
        for g, keep in zip(gates, saved, strict=True):
            g.static_keep.copy_(keep)


def check_budget(model: nn.Module, budget: object, example: Tensor) -> float:
    """``budget`` as a float, checked against what ``model``'s gates can reach: one line
    saying why not otherwise, before any training."""
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise ValueError(
            f"budget is the fraction of the dense network's FLOPs to end at, a number in "
            f"(0, 1] (0.125 for 8x fewer), got {budget!r}"
        )
    floor = smallest_cost(model, example)
    if budget < floor:
        raise ValueError(
            f"budget {budget:g} is below what the gates can reach: with one unit left per "
            f"gate the network still costs {floor:.4g} of its dense FLOPs (ungated layers, "
            f"the output layer); ask for {floor:.4g} or more"
        )
    return float(budget)


@torch.no_grad()
def settle_(
    model: nn.Module,
    target: float,
    example: Tensor,
    data: Tensor | None = None,
    *,
    cost: float | None = None,
) -> int:
    """Remove, in place, the units with the lowest keep scores across ``model``'s gates
    until the cost (:func:`cost_fraction`) is at most ``target``: the fewest units
    that do it, found by bisection over the ranked units (each gate keeps at least
    its best unit, so the target must not be below :func:`smallest_cost`). Returns
    how many were removed (0 when the cost is at the target or below already).
    ``cost``: the model's cost now, when the caller measured it."""
    if (cost_fraction(model, example, data) if cost is None else cost) <= target:
        return 0
    gates = [layer.gate for _, layer in gated_layers(model)]
    kept = [g.keep_mask().clone() for g in gates]
    ranked = []  # (score, gate, unit) of the units that may go: each gate keeps its best
    for i, g in enumerate(gates):
        scores = g.keep_scores()
        best = int(torch.where(kept[i], scores, -torch.inf).argmax())
        ranked += [(float(s), i, k) for k, s in enumerate(scores.tolist())
                   if kept[i][k] and k != best]  # fmt: skip
    ranked.sort()

    def remove(n: int) -> None:  # the n lowest-ranked units off, the others as kept
        for i, g in enumerate(gates):
            g.static_keep.copy_(kept[i])
        for _, i, k in ranked[:n]:
            gates[i].static_keep[k] = False

    lo, hi = 0, len(ranked)
    while lo < hi:
        mid = (lo + hi) // 2
        remove(mid)
        if cost_fraction(model, example, data) <= target:
            hi = mid
        else:
            lo = mid + 1
    remove(lo)
    return lo
