"""``sweep``: one method's regularisation strength swept on held-out training data, the
scale the selection rule chooses recorded with every point, and the fronts redrawn."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bbdrop import records
from bbdrop.config import RunConfig, apply_overrides, to_toml
from bbdrop.data import Dataset
from bbdrop.distributed import init_from_env
from bbdrop.files import json_bytes, write_together
from bbdrop.pipeline import load_data
from bbdrop.stages import resolve_device
from bbdrop.threads import machine
from bbdrop.train.loop import Progress

from .borrowing import _borrow_stages
from .catalogue import experiment_config
from .figures import write_front
from .runner import _check_outputs_of, _check_seeds_and_jobs, _method_plans, _run_plans
from .scales import SELECTION_MARGIN, _check_scales, _scaled, scale_name, select_scale


def sweep(
    name: str,
    method: str,
    scales: Sequence[float],
    seeds: Sequence[int] = (1,),
    out_root: str | Path = "runs",
    overrides: Sequence[str] = (),
    *,
    validation: int = 10000,
    data: Dataset | None = None,
    progress: Callable[[int], Progress] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Sweep ``method``'s regularisation strength on held-out training data.

    Each scale s multiplies the weight of the method's regulariser in its
    configuration (``gate.kl_scale``, ``gate.conv_kl_scale`` and every
    ``gate.layer_kl_scale``; for ``dbb``,
    ``gate.dbb_kl_scale``), with ``data.validation = validation``: every error is
    measured on the last ``validation`` training examples and the test set is
    not read. All runs of a seed start from the same pretrained network, the one of an
    earlier sweep of the experiment in ``out_root`` when its pretraining was the same
    (so the fronts of all methods share it). Writes
    ``<out>/<name>/sweep/<method>/sweep.json`` (every point, and the scale the
    rule of :data:`SELECTION_MARGIN` chooses) and ``chosen.toml`` (the chosen
    configuration, for the test set: ``data.validation`` back to 0), then the
    front figure of every method swept so far in ``<out>/<name>/sweep/``.
    """
    _check_scales(scales)
    _check_seeds_and_jobs(seeds, jobs)
    base = experiment_config(name, [*overrides, f"data.validation={validation}"])
    init_from_env(resolve_device(base.device))  # under torchrun (docs/distributed.md)
    if base.budget.flops is not None or base.budget.params is not None:
        raise ValueError(
            "a sweep varies the regulariser's strength, which a budget (budget.flops, "
            "budget.params) "
            "steers itself: run or reproduce with the budget, or sweep without it"
        )
    root = Path(out_root) / base.name / "sweep" / method
    (cfg, _), = _method_plans(name, base, [*overrides, f"data.validation={validation}"],
                              [method], root).values()  # fmt: skip
    _check_sweep_outputs(root, base.name)
    scale_of = {scale_name(x): float(x) for x in scales}
    plans = {key: (_scaled(cfg, method, x), root / key) for key, x in scale_of.items()}
    _borrow_for_sweep(root.parent, plans, seeds)
    given = data is not None
    if data is None:
        data = load_data(base)
    by_run = _run_plans(plans, seeds, data, given, progress, jobs, base.threads)
    points = _sweep_points(by_run, plans, scale_of, method, cfg)
    chosen = select_scale(points)
    record = _sweep_record(base.name, method, validation, chosen, points)
    best = apply_overrides(_scaled(cfg, method, chosen), ["data.validation=0"])
    write_together({root / "sweep.json": json_bytes(record),
                    root / "chosen.toml": to_toml(best).encode()})  # fmt: skip
    front = write_front(Path(out_root) / base.name / "sweep")
    return {"record": record, "chosen": best, "figures": front}


def _check_sweep_outputs(root: Path, name: str) -> None:
    """ValueError, before any training, unless the earlier sweeps of the experiment in
    ``root.parent`` read back (the front reads them all) and the sweep's record and the
    front figures can be written."""
    records.read_sweeps(root.parent, name=name)  # the front reads them all: check first
    _check_outputs_of(root, ["sweep.json", "chosen.toml"])
    _check_outputs_of(root.parent, [f"{f}{s}" for f in ("front", "units")
                                    for s in (".png", ".pdf")])  # fmt: skip


def _borrow_for_sweep(
    sweeps: Path, plans: dict[str, tuple[RunConfig, Path]], seeds: Sequence[int]
) -> None:
    """Every scale's seed folder given the finished stages of the experiment's other
    sweeps in ``sweeps`` that are the same computation (bbdrop.experiments.borrowing)."""
    for seed in seeds:  # every sweep of the experiment starts from one pretrained network
        for plan_cfg, folder in plans.values():  # and any scale from a BB run it matches
            seeded = apply_overrides(plan_cfg, [f"seed={seed}"])
            _borrow_stages(sweeps, f"*/x*/seed-{seed}", seeded, folder / f"seed-{seed}")


def _sweep_points(
    by_run: dict[tuple[str, int], dict[str, Any]],
    plans: dict[str, tuple[RunConfig, Path]],
    scale_of: dict[str, float],
    method: str,
    cfg: RunConfig,
) -> list[dict[str, Any]]:
    """One point per run of the sweep (scale, seed): the swept stage's figures on the
    held-out data, and its dense network's error."""
    stage = "dbb" if method == "dbb" else cfg.gate.method
    points = []
    for (key, seed), result in by_run.items():
        r = result["stages"][stage]
        g = plans[key][0].gate
        points.append({
            "scale": scale_of[key], "seed": seed, "error": r["error"],
            "kl_scale": g.dbb_kl_scale if method == "dbb" else g.kl_scale,
            "speedup": r["speedup"], "speedup_authors": r["speedup_authors"],
            "memory_params_authors": r["memory_params_authors"],
            "units": r["active"] or r["units"], "at_chance": r["at_chance"],
            "dense_error": result["stages"]["pretrain"]["error"],
        })  # fmt: skip
    return points


def _sweep_record(
    name: str, method: str, validation: int, chosen: float, points: list[dict[str, Any]]
) -> dict[str, Any]:
    """The content of ``sweep.json``: the sweep, where it ran, the rule, its choice and
    every point."""
    return {"name": name, "method": method, "validation": validation,
            "machine": machine(), "torch": torch.__version__,
            "rule": f"highest median validation speedup with median validation error <= "
                    f"median dense validation error + {SELECTION_MARGIN}",
            "chosen_scale": chosen, "points": points}  # fmt: skip
