"""A FLOP budget that is hit: the network pruned along a path from its dense cost to a
target fraction of its FLOPs, the gates' own regularisation steered to follow it. A
:class:`Budget` may ask for a fraction of the parameters instead, or both: the same
steering, on the one cost :meth:`Budget.cost` makes of them.

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
measurement at or below the target. Where that measurement is below :data:`FILL`
times the target (the pruning rushed on between two: BB at 1/16 of LeNet5-Caffe went
from above 0.0625 to 0.0543 in 31 steps), the gates go back to the epoch's last
measurement above it (or its first step), and the ranked removal lands at the target;
not for SSL and SVD, whose decisions are their layers' weights. Otherwise a unit the
method removed is never added back, so a network whose own pruning went below the
target stays there (reported).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.attach import gated_layers, side_effect_free
from bbdrop.config import OptimConfig
from bbdrop.gates.base import Gate

__all__ = [
    "CHECKS", "DBB_HEADROOM", "FILL", "GUARD", "Budget", "BudgetController", "after_the_path",
    "as_budget", "check_budget", "cost_fraction", "cost_fractions", "settle_", "smallest_cost",
    "stage_goals",
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
# CHECKS times per epoch (every 25 steps until an epoch has been counted; at least
# MIN_EVERY steps apart, as a measurement of DBB's cost runs 1000 inputs), and the
# gates freeze when it is at or below the target: a guarded epoch can overshoot by a
# CHECKS-th of its pruning, not by all of it.
GUARD, CHECKS, FIRST_EVERY, MIN_EVERY = 2.0, 16, 25, 10
# The landing at a budget: below FILL times it (half the 5% a budget's hit allows),
# units the ranked removal took are put back while the cost stays within it, and where
# none fits, one goes back in exchange for cheaper ones (settle_); at most SWAP_TRIALS
# cost measurements per unit tried back.
FILL = 0.975
SWAP_TRIALS = 256


@dataclass(frozen=True)
class Budget:
    """What to end at: a fraction of the dense network's FLOPs (expected, with run-time
    skipping, for DBB), of its parameters, or both. The cost steered to it is one
    number in the units of :attr:`target` (:meth:`cost`): the FLOP fraction, the
    parameter fraction, or with both, the larger of the FLOP fraction and the
    parameter fraction times ``flops / params``, which is at most ``target`` exactly
    when both are met."""

    flops: float | None = None
    params: float | None = None

    def __post_init__(self) -> None:
        wrong = validate.budget_fractions(self, "a budget's ")
        if wrong:
            raise ValueError(wrong)
        if self.flops is None and self.params is None:
            raise ValueError("a Budget needs flops=, params= or both (fractions of the dense "
                             "network's)")  # fmt: skip

    @property
    def target(self) -> float:
        """The value :meth:`cost` must end at or below."""
        return self.flops if self.flops is not None else self.params  # type: ignore[return-value]

    def cost(self, flops: float, params: float) -> float:
        """The cost of a network with these fractions of the dense FLOPs and parameters,
        in the units of :attr:`target`."""
        if self.params is None:
            return flops
        if self.flops is None:
            return params
        return max(flops, params * self.flops / self.params)

    def __str__(self) -> str:
        parts = [f"{v:g} of the dense {what}" for v, what in
                 ((self.flops, "FLOPs"), (self.params, "parameters")) if v is not None]  # fmt: skip
        return " and ".join(parts)


def as_budget(budget: object) -> Budget:
    """``budget`` as a :class:`Budget`: a number is a FLOP fraction."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise ValueError(
            f"budget is the fraction of the dense network's FLOPs to end at, a number in "
            f"(0, 1] (0.125 for 8x fewer), or a bbdrop.Budget(flops=..., params=...), got "
            f"{budget!r}"
        )
    return Budget(flops=budget)


def stage_goals(
    budget: float | Budget, stages: Sequence[str]
) -> dict[str, tuple[float, Budget]]:
    """(start, goal) of the cost for each gated training stage of a run that a budget
    steers, in order: the last ends at ``budget``; a BB stage before a DBB stage ends
    at its FLOP budget times :data:`DBB_HEADROOM` (at most dense) and at its parameter
    budget, and DBB's skipping brings the FLOPs down from there. DBB's skipping changes
    no parameter: under a parameter budget alone the DBB stage is not steered (left
    out), the BB stage meets it. ``start``: the cost, in the goal's units, that the
    stage starts from (the dense network's, or the stage before's goal)."""
    budget = as_budget(budget)
    goals, flops, params = {}, 1.0, 1.0  # where the stage starts
    for i, stage in enumerate(stages):
        if i == len(stages) - 1:
            if stage == "dbb" and budget.flops is None:
                break
            goal = budget
        else:
            headroom = None if budget.flops is None else min(1.0, budget.flops * DBB_HEADROOM)
            goal = Budget(flops=headroom, params=budget.params)
        goals[stage] = (goal.cost(flops, params), goal)
        flops, params = goal.flops or 1.0, goal.params or 1.0
    return goals


def after_the_path(optim: OptimConfig) -> OptimConfig:
    """``optim`` with its step decay moved into the part of the stage after the path has
    reached the target: a milestone m (a fraction of the stage's epochs) becomes
    RAMP + (1 - RAMP) m. The weights then learn at the full rate while units are being
    removed, and the network the budget leaves adapts to its last removals before the
    rate falls (with the decay at its usual place, a short stage met its last removals
    at a hundredth of the rate: docs/sparsify.md, "Tutorial")."""
    return replace(optim, milestones=tuple(RAMP + (1 - RAMP) * m for m in optim.milestones))


def cost_fraction(
    model: nn.Module, example: Tensor, data: Tensor | None = None, budget: Budget | None = None
) -> float:
    """The FLOPs of the network ``model``'s gates give, as a fraction of the dense
    network's: the compacted network's, with run-time skipping for DBB
    (:func:`bbdrop.network_costs`); with a ``budget`` on parameters, its cost
    (:meth:`Budget.cost`)."""
    flops, params = cost_fractions(model, example, data)
    return flops if budget is None or budget.params is None else budget.cost(flops, params)


def cost_fractions(
    model: nn.Module, example: Tensor, data: Tensor | None = None
) -> tuple[float, float]:
    """The FLOPs (DBB: expected, with its skipping) and the parameters of the network
    ``model``'s gates give, each as a fraction of the dense network's, from one
    compaction (:func:`bbdrop.network_costs`)."""
    from bbdrop.compaction import compact
    from bbdrop.metrics import network_costs

    small = compact(model, example, check=False)  # the search compacts many times
    costs = network_costs(model, example, data, compacted=small)
    return (costs.expected_flops / costs.dense_flops,
            costs.parameters / costs.dense_parameters)  # fmt: skip


@dataclass
class BudgetController:
    """Steers ``model``'s gates toward ``budget`` (a FLOP fraction or a :class:`Budget`)
    over a stage (module docstring); a :class:`bbdrop.train.loop.Controller`."""

    model: nn.Module
    budget: float | Budget  # a Budget after construction
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
    _fell: tuple[float, int] | None = field(default=None, init=False, repr=False)
    # the gates (parameters, units off) at the epoch's last measurement above the target
    _above: list[tuple[list[Tensor], Tensor]] | None = field(default=None, init=False,
                                                             repr=False)  # fmt: skip

    def __post_init__(self) -> None:
        self.budget = as_budget(self.budget)
        self._base = {name: layer.gate.kl_scale for name, layer in gated_layers(self.model)}

    @property
    def target(self) -> float:
        """The cost to end at or below (:attr:`Budget.target`)."""
        return self.budget.target  # type: ignore[union-attr]

    def cost(self, model: nn.Module) -> float:
        """``model``'s cost in the budget's units (:func:`cost_fraction`)."""
        return cost_fraction(model, self.example, self.data, self.budget)  # type: ignore[arg-type]

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
        if not self.guarding():
            return
        if self._above is None:  # the epoch's start (its first step): above the target
            self._above = _gate_state(model)
        every = max(MIN_EVERY, self.steps // CHECKS) if self.steps else FIRST_EVERY
        if step % every:
            return
        with side_effect_free(model), torch.random.fork_rng(devices=[]):  # eval, no draw
            cost = self.cost(model)
        if cost > self.target:
            self._above = _gate_state(model)
            return
        self._land(model, cost)
        self.frozen, self._frozen_at = True, step
        self._apply()

    def _land(self, model: nn.Module, cost: float) -> float:
        """Where the cost fell below FILL times the target since the last measurement
        above it (a method's own pruning can take a fifth of the cost between two: BB
        at 1/16 of LeNet5-Caffe from above 0.0625 to 0.0543 in 31 steps), the gates go
        back to that measurement (their parameters and units off) and the ranked
        removal lands at the target (:func:`settle_` with fill). Not for gates whose
        values are their layer's weights (SSL, SVD: the gates alone do not hold the
        state to go back to), nor where the gates as they were are not above the target.
        Returns the cost after."""
        above, self._above = self._above, None
        gates = [layer.gate for _, layer in gated_layers(model)]
        if (above is None or cost >= FILL * self.target
                or any(type(g).needs_bound_layer for g in gates)):  # fmt: skip
            return cost
        now = _gate_state(model)
        _set_gate_state(model, above)
        with torch.random.fork_rng(devices=[]):  # cost_fraction keeps modes and buffers
            if self.cost(model) <= self.target:
                _set_gate_state(model, now)
                return cost
            removed = settle_(model, as_budget(self.budget), self.example, self.data, fill=True)
            self._fell = (cost, removed)
            return self.cost(model)

    def after_epoch(self, model: nn.Module, record: Any, epochs: int) -> None:
        self.steps, self._step = self._step or self.steps, 0
        cost = self.cost(model)
        if not self.frozen and cost <= self.target:
            cost = self._land(model, cost)
        self._above = None  # a checkpoint ends the epoch: nothing carried into the next
        goal = self.path(record.epoch, epochs)
        removed = (settle_(model, goal, self.example, self.data, cost=cost, budget=self.budget,
                           fill=goal <= self.target) if cost > goal else 0)  # fmt: skip
        entry = {"epoch": record.epoch, "cost": cost, "path": goal, "removed": removed}
        if self._fell is not None:  # the gates went back to a measurement above it
            entry["fell_to"], back = self._fell
            entry["removed"], self._fell = removed + back, None
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


def _gate_state(model: nn.Module) -> list[tuple[list[Tensor], Tensor]]:
    """A copy of each gate's parameters and units off (:meth:`BudgetController._land`)."""
    return [([p.detach().clone() for p in g.parameters()], g.static_keep.clone())
            for g in (layer.gate for _, layer in gated_layers(model))]  # fmt: skip


@torch.no_grad()
def _set_gate_state(model: nn.Module, state: list[tuple[list[Tensor], Tensor]]) -> None:
    """Put back a :func:`_gate_state`, in place."""
    for (_, layer), (params, keep) in zip(gated_layers(model), state, strict=True):
        for p, value in zip(layer.gate.parameters(), params, strict=True):
            p.copy_(value)
        layer.gate.static_keep.copy_(keep)


@torch.no_grad()
def smallest_cost(model: nn.Module, example: Tensor, budget: Budget | None = None) -> float:
    """The cost (:func:`cost_fraction`, in ``budget``'s units: the FLOP fraction by
    default) with one unit left per gate: no budget below it can be met. ``model`` is
    left as it was."""
    gates = [layer.gate for _, layer in gated_layers(model)]
    saved = [g.static_keep.clone() for g in gates]
    try:
        for g in gates:
            g.static_keep.zero_()
            g.static_keep[int(g.keep_scores().argmax())] = True
        return cost_fraction(model, example, budget=budget)
    finally:
        for g, keep in zip(gates, saved, strict=True):
            g.static_keep.copy_(keep)


def check_budget(model: nn.Module, budget: object, example: Tensor) -> Budget:
    """``budget`` (a FLOP fraction or a :class:`Budget`) as a :class:`Budget`, checked
    against what ``model``'s gates can reach: one line saying why not otherwise,
    before any training."""
    budget = as_budget(budget)
    for asked, what, units in ((budget.flops, "FLOPs", None), (budget.params, "parameters",
                                                                 Budget(params=1.0))):  # fmt: skip
        if asked is None:
            continue
        floor = smallest_cost(model, example, units)
        if asked < floor:
            raise ValueError(
                f"budget {asked:g} of the {what} is below what the gates can reach: with one "
                f"unit left per gate the network still has {floor:.4g} of its dense {what} "
                f"(ungated layers, the output layer); ask for {floor:.4g} or more"
            )
    return budget


@torch.no_grad()
def settle_(
    model: nn.Module,
    target: float | Budget,
    example: Tensor,
    data: Tensor | None = None,
    *,
    cost: float | None = None,
    budget: Budget | None = None,
    fill: bool = False,
) -> int:
    """Remove, in place, the units with the lowest keep scores across ``model``'s gates
    until the cost (:func:`cost_fraction`) is at most ``target``: the fewest units
    that do it, found by bisection over the ranked units (each gate keeps at least
    its best unit, so the target must not be below :func:`smallest_cost`). Returns
    how many were removed (0 when the cost is at the target or below already).
    ``target``: a FLOP fraction, a :class:`Budget` (its :attr:`~Budget.target`, in its
    units), or a number in the units of ``budget``. ``cost``: the model's cost now,
    when the caller measured it.

    ``fill``: where the last unit the bisection removed was a costly one (a filter of
    a narrow convolution: one of LeNet5's last three conv1 filters is 1.8% of the dense
    FLOPs, almost a third of a 1/16 budget), and the cost lands below :data:`FILL`
    times the target, the
    removed units are put back, the best ranked first, each where the cost stays at
    most the target, until it is at least :data:`FILL` times the target. Where it is
    still below and no removed unit fits back alone, a removed unit goes back in
    exchange for kept ones, the lowest ranked first, skipping any whose removal would
    take the cost below where it landed: the exchange is kept where it lands closer to
    the target, within it (LeNet5 at 1/8 by SVD: a conv2 filter back for inputs of fc1).
    For the landing at a budget, not for the steps of the path. Returns the units off
    at the end that the ranking had on."""
    if isinstance(target, Budget):
        target, budget = target.target, target
    if (cost_fraction(model, example, data, budget) if cost is None else cost) <= target:
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
        if cost_fraction(model, example, data, budget) <= target:
            hi = mid
        else:
            lo = mid + 1
    remove(lo)
    if not (fill and lo):
        return lo
    landed = cost_fraction(model, example, data, budget)
    for _, i, k in reversed(ranked[:lo]):  # the best ranked of the removed first
        if landed >= FILL * target:
            break
        gates[i].static_keep[k] = True
        now = cost_fraction(model, example, data, budget)
        if now <= target:
            landed = now
        else:
            gates[i].static_keep[k] = False
    if landed < FILL * target:
        _exchange(gates, ranked[:lo], ranked, landed, target,
                  lambda: cost_fraction(model, example, data, budget))  # fmt: skip
    return sum(1 for _, i, k in ranked if not bool(gates[i].static_keep[k]))


def _exchange(
    gates: list[Gate],
    removed: list[tuple[float, int, int]],
    ranked: list[tuple[float, int, int]],
    landed: float,
    target: float,
    cost: Callable[[], float],
) -> None:
    """:func:`settle_`'s last resort for a landing below FILL times ``target``: each unit
    of ``removed`` still off, the best ranked first, goes back, and units of ``ranked``
    still on go off, the lowest ranked first, skipping those that would take the cost
    below ``landed``, until the cost is within ``target``; kept where it lands above
    ``landed``, undone otherwise."""
    for _, i, k in reversed(removed):
        if landed >= FILL * target:
            break
        if bool(gates[i].static_keep[k]):
            continue
        gates[i].static_keep[k] = True
        taken: list[tuple[int, int]] = []
        now, trials = cost(), 0
        for _, j, u in ranked:
            if now <= target or trials >= SWAP_TRIALS:
                break
            if (j, u) == (i, k) or not bool(gates[j].static_keep[u]):
                continue
            gates[j].static_keep[u] = False
            trials += 1
            lower = cost()
            if lower < landed:  # too costly a unit to take: it would land lower still
                gates[j].static_keep[u] = True
                continue
            taken.append((j, u))
            now = lower
        if landed < now <= target:
            landed = now
            continue
        for j, u in taken:  # no closer landing: as it was
            gates[j].static_keep[u] = True
        gates[i].static_keep[k] = False
