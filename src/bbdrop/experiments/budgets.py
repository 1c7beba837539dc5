"""A method's runs at FLOP budgets, beside its own sweep front (docs/sparsify.md, "Budgets
beside the fronts").

``budget_sweep(name, method, budgets)`` runs the experiment's method once per budget
and seed on held-out training data (``data.validation``, as a sweep: the test set is
not read), each run steered to its budget (``budget.flops``, :mod:`bbdrop.budget`),
all from the pretrained network of the experiment's sweeps when they share it. Each
point says whether the budget was hit (the paper's FLOP count of the final network,
within :data:`HIT` of the target) and compares its validation error with the method's
own front, from ``bbdrop sweep`` without a budget, interpolated at the same speedup
(:func:`front_error`): within :data:`GOOD` points counts as good. Errors are compared
as their excess over each run's own dense network: the same thing when the budget
runs start from the sweeps' pretrained network, and the fair comparison when that
network was trained again elsewhere (floating point differs between machines). Writes
``<out>/<name>/budget/<method>/budget.json``, then ``<out>/<name>/budget/front``: the
swept fronts with every budget point drawn on them.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bbdrop import records
from bbdrop.config import apply_overrides
from bbdrop.data import Dataset
from bbdrop.distributed import init_from_env
from bbdrop.files import check_writable, json_bytes, write_together
from bbdrop.pipeline import load_data
from bbdrop.stages import resolve_device
from bbdrop.threads import machine
from bbdrop.train.loop import Progress

from .borrowing import _borrow_stages
from .catalogue import experiment_config
from .runner import _check_outputs_of, _check_seeds_and_jobs, _method_plans, _run_plans

__all__ = ["GOOD", "HIT", "budget_sweep", "budget_table", "front_error"]

HIT = 0.05  # a budget is hit when the FLOP fraction reached is within 5% of it (relative)
GOOD = 0.3  # points of validation error above the method's own front, at the same speedup


def budget_sweep(
    name: str,
    method: str,
    budgets: Sequence[float],
    seeds: Sequence[int] = (1,),
    out_root: str | Path = "runs",
    overrides: Sequence[str] = (),
    *,
    validation: int = 10000,
    data: Dataset | None = None,
    progress: Callable[[int], Progress] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run ``method`` of experiment ``name`` at each FLOP budget (module docstring).
    Returns ``{"record": <budget.json>, "table": <markdown>, "figures": [paths]}``."""
    if isinstance(budgets, (str, bytes)) or not budgets or not all(
        isinstance(b, int | float) and not isinstance(b, bool) and 0 < b <= 1 for b in budgets
    ):
        raise ValueError(f"budgets must be fractions of the dense FLOPs in (0, 1], got {budgets!r}")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets repeat: {', '.join(map(repr, budgets))}; give each once")
    _check_seeds_and_jobs(seeds, jobs)
    held = [*overrides, f"data.validation={validation}"]
    base = experiment_config(name, held)
    init_from_env(resolve_device(base.device))  # under torchrun (docs/distributed.md)
    top = Path(out_root) / base.name
    root = top / "budget" / method
    (cfg, _), = _method_plans(name, base, held, [method], root).values()  # fmt: skip
    _check_outputs_of(root, ["budget.json"])
    _check_outputs_of(root.parent, ["front.png", "front.pdf"])
    plans = {budget_name(b): (apply_overrides(cfg, [f"budget.flops={b}"]), root / budget_name(b))
             for b in budgets}  # fmt: skip
    for seed in seeds:  # the pretrained network of the experiment's sweeps, where the same
        for plan_cfg, folder in plans.values():  # (or of its other budget runs)
            seeded = apply_overrides(plan_cfg, [f"seed={seed}"])
            for runs, pattern in (("sweep", "*/x*"), ("budget", "*/b*")):
                _borrow_stages(top / runs, f"{pattern}/seed-{seed}", seeded,
                               folder / f"seed-{seed}")  # fmt: skip
    given = data is not None
    by_run = _run_plans(plans, seeds, data if given else load_data(base), given, progress,
                        jobs, base.threads)  # fmt: skip
    stage = "dbb" if method == "dbb" else cfg.gate.method
    curve = _own_front(top / "sweep", method)
    points = []
    for (key, seed), result in by_run.items():
        r = result["stages"][stage]
        target = plans[key][0].budget.flops
        reached = 1.0 / r["speedup"]
        dense = result["stages"]["pretrain"]["error"]
        excess = None if curve is None else front_error(curve, r["speedup"])
        own = None if excess is None else dense + excess  # the front, on this dense network
        points.append({
            "budget": target, "seed": seed, "error": r["error"], "speedup": r["speedup"],
            "reached": reached, "hit": abs(reached - target) <= HIT * target,
            "steered_cost": r["budget"]["cost"], "settled": r["budget"]["settled"],
            "front_error": own, "good": None if own is None else r["error"] <= own + GOOD,
            "dense_error": dense, "units": r["active"] or r["units"],
        })  # fmt: skip
    record = {"name": base.name, "method": method, "validation": validation,
              "machine": machine(), "torch": torch.__version__,
              "rule": f"hit: the paper's FLOP count within {HIT:.0%} of the budget; good: "
                      f"validation error <= the method's own front at the same speedup + {GOOD}",
              "points": points}  # fmt: skip
    write_together({root / "budget.json": json_bytes(record)})
    return {"record": record, "table": budget_table([record]),
            "figures": write_budget_front(top)}


def budget_name(budget: float) -> str:
    """The folder of a budget's runs: ``b0.125``."""
    return f"b{budget:g}"


def _own_front(sweeps: Path, method: str) -> list[tuple[float, float]] | None:
    """The method's front from ``<sweeps>/<method>/sweep.json`` (:func:`_front`), or None
    when it was not swept."""
    for _, record in records.read_sweeps(sweeps) if sweeps.is_dir() else []:
        if record["method"] == method:
            return _front(record)
    return None


def _front(record: dict[str, Any]) -> list[tuple[float, float]]:
    """A sweep record's front: per scale, the median speedup and the median error above
    the point's own dense network."""
    points = record["points"]
    return [(statistics.median(p["speedup"] for p in points if p["scale"] == x),
             statistics.median(p["error"] - p["dense_error"] for p in points
                               if p["scale"] == x))
            for x in sorted({p["scale"] for p in points})]  # fmt: skip


def front_error(curve: Sequence[tuple[float, float]], speedup: float) -> float | None:
    """The error of a front (points (speedup, error)) at ``speedup``: linear in
    log(speedup) between the two points around it, in order of speedup; None outside
    the front (no extrapolation)."""
    pts = sorted(curve)
    for (s0, e0), (s1, e1) in itertools.pairwise(pts):
        if s0 <= speedup <= s1:
            if s1 == s0:
                return min(e0, e1)
            t = (math.log(speedup) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return e0 + t * (e1 - e0)
    return None


def budget_table(records_: Sequence[dict[str, Any]]) -> str:
    """A markdown table of budget records: one row per method, budget and seed."""
    rows = ["| method | budget | reached | hit | val. error (%) | own front at that speedup "
            "| difference | good |", "|---|---:|---:|:---:|---:|---:|---:|:---:|"]
    for record in records_:
        for p in sorted(record["points"], key=lambda p: (-p["budget"], p["seed"])):
            own, diff = "-", "-"
            if p["front_error"] is not None:
                own, diff = f"{p['front_error']:.2f}", f"{p['error'] - p['front_error']:+.2f}"
            good = "-" if p["good"] is None else ("yes" if p["good"] else "no")
            rows.append(f"| {record['method']} | {p['budget']:g} | {p['reached']:.4f} | "
                        f"{'yes' if p['hit'] else 'no'} | {p['error']:.2f} | {own} | {diff} "
                        f"| {good} |")  # fmt: skip
    return "\n".join(rows)


def write_budget_front(top: Path) -> list[Path]:
    """``<top>/budget/front.png`` and ``.pdf``: the fronts of ``<top>/sweep`` with each
    method's budget points (seed medians per budget) as stars; none without sweeps."""
    from bbdrop import plots

    sweeps = top / "sweep"
    loaded = records.read_sweeps(sweeps) if sweeps.is_dir() else []
    if not loaded:
        return []
    # errors above each run's own dense network, on the fronts and at the budgets
    curves = {r["method"]: [{"speedup": s, "error": e} for s, e in _front(r)]
              for _, r in loaded}  # fmt: skip
    marked: dict[str, list[dict[str, float]]] = {}
    for path in sorted((top / "budget").glob("*/budget.json")):
        record = records.read_json(path)
        for b in sorted({p["budget"] for p in record["points"]}):
            at = [p for p in record["points"] if p["budget"] == b]
            marked.setdefault(record["method"], []).append({
                "speedup": statistics.median(p["speedup"] for p in at),
                "error": statistics.median(p["error"] - p["dense_error"] for p in at)})  # fmt: skip
    out = top / "budget" / "front"
    for suffix in (".png", ".pdf"):
        check_writable(out.with_suffix(suffix))
    fig = plots.plot_front(curves, marked, 0.0, "validation fronts (stars: runs at a FLOP "
                           "budget, seed medians)", None,
                           "error minus its own dense network's (points)")  # fmt: skip
    return list(plots.save_figure(fig, out))
