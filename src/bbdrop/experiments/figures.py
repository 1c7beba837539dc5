"""The figures: a run's training curves and DBB mask figures (``write_figures``), and the
fronts of an experiment's sweeps with the units kept per layer (``write_front``)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bbdrop import records
from bbdrop.attach import collect_masks, gated_layers
from bbdrop.config import RunConfig, load_recorded_config
from bbdrop.data import Dataset
from bbdrop.factories import is_factory
from bbdrop.files import check_writable
from bbdrop.pipeline import resolve_device, stage_model
from bbdrop.stages import placement
from bbdrop.train.checkpoint import load_checkpoint, load_model_state

from .catalogue import experiment_config, list_experiments
from .order import _rank
from .scales import SELECTION_MARGIN

# The figures of a reproduction (write_figures), each as .png and .pdf.
FIGURE_NAMES = ("training-curves", "input-masks", "mask-correlations", "example-masks")


def write_figures(cfg: RunConfig, run_dir: Path, data: Dataset, out: Path) -> list[Path]:
    """Training curves of the run, and the DBB mask figures on the test set."""
    from bbdrop import plots

    results = json.loads((run_dir / "results.json").read_text())
    history = {s: r["history"] for s, r in results["stages"].items() if s != "preprune"}
    written = plots.save_figure(plots.plot_history(history, cfg.name), out / "training-curves")
    stage = "dbb"
    if not (run_dir / f"{stage}.pt").exists():
        return written
    device = resolve_device(cfg.device)
    model = stage_model(cfg, stage, data.num_classes, data.train_x[:8]).to(device)
    path = run_dir / f"{stage}.pt"
    load_model_state(model, load_checkpoint(path, map_location=device), path)
    x, y = data.test_x.to(device), data.test_y.cpu()
    masks = collect_masks(model, x)
    first, first_masks = next(iter(masks.items()))
    averages = {n: plots.class_average_masks(m, y, data.num_classes) for n, m in masks.items()}
    if first_masks.shape[1] == 784:  # an MLP on 28x28 images: the paper's Fig. 1
        fig = plots.plot_input_masks(averages[first], (28, 28), f"{cfg.name}: DBB, input layer")
        written += plots.save_figure(fig, out / "input-masks")
    corr = {n: plots.class_correlations(a) for n, a in averages.items()}
    written += plots.save_figure(
        plots.plot_correlations(corr, f"{cfg.name}: DBB"), out / "mask-correlations"
    )
    written += plots.save_figure(
        plots.plot_example_masks(masks, y, 10, f"{cfg.name}: DBB"), out / "example-masks"
    )
    return written


def write_front(
    sweeps_dir: Path,
    tested: Sequence[dict[str, Any]] | None = None,
    out: Path | None = None,
    prefix: str = "",
) -> list[Path]:
    """The front figure of every ``<sweeps_dir>/<method>/sweep.json``, and the units kept
    per layer at each method's chosen scale (seed medians), as ``<out>/<prefix>front``
    and ``<out>/<prefix>units`` (``out``: ``sweeps_dir``). ``tested``: the runs of
    the chosen settings on the test set (``reproduce(...)["runs"]`` or
    :func:`tested_runs`), whose points, one per seed, are drawn on top instead of
    the chosen validation points, and whose units the second figure shows. When the
    sweeps do not share their dense network (a seed's dense error differs between
    records), every error is drawn as its excess over its own dense network's."""
    from bbdrop import plots

    loaded = records.read_sweeps(Path(sweeps_dir))
    if not loaded:
        return []
    name = loaded[0][1]["name"]
    _check_tested(tested, name, Path(sweeps_dir))
    records_ = [r for _, r in loaded]
    relative = _dense_differs(records_)
    curves, chosen, units = _validation_points(records_, relative)
    dense = 0.0 if relative else statistics.median(
        p["dense_error"] for r in records_ for p in r["points"])  # fmt: skip
    if tested is not None:
        chosen, units = _tested_points(tested, curves, relative)
    out = sweeps_dir if out is None else Path(out)
    for stem in ("front", "units"):  # every path checked before the first is written
        for suffix in (".png", ".pdf"):
            check_writable(out / f"{prefix}{stem}{suffix}")
    figures = _front_figures(curves, chosen, units, dense, relative, tested, name,
                             Path(sweeps_dir))  # fmt: skip
    return [path for stem, fig in figures.items()
            for path in plots.save_figure(fig, out / f"{prefix}{stem}")]  # fmt: skip


def _dense_differs(records_: Sequence[dict[str, Any]]) -> bool:
    """Whether the sweeps come from different pretrained networks (e.g. made on different
    machines): a seed's dense error differs between records. They are then compared by
    their error above their own dense network's."""
    seeds = {p["seed"] for r in records_ for p in r["points"]}
    return any(
        len({p["dense_error"] for r in records_ for p in r["points"] if p["seed"] == seed}) > 1
        for seed in seeds
    )


def _validation_points(
    records_: Sequence[dict[str, Any]], relative: bool
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]],
           dict[str, dict[str, float]]]:  # fmt: skip
    """Per method of the sweep records: its front (median speedup and error at each
    scale), its chosen point, and the units kept per layer at its chosen scale (seed
    medians; none for records transcribed from a table). ``relative``: errors as their
    excess over the dense network's."""
    curves: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, list[dict[str, Any]]] = {}
    units: dict[str, dict[str, float]] = {}
    for record in records_:
        points = [{**p, "error": p["error"] - p["dense_error"]} if relative else p
                  for p in record["points"]]  # fmt: skip
        scales = sorted({p["scale"] for p in points})
        curves[record["method"]] = [
            {k: statistics.median(p[k] for p in points if p["scale"] == x)
             for k in ("speedup", "error")} for x in scales
        ]  # fmt: skip
        at = [p["units"] for p in points if p["scale"] == record["chosen_scale"] and "units" in p]
        chosen[record["method"]] = [curves[record["method"]][scales.index(record["chosen_scale"])]]
        if at:  # (records transcribed from a table have no units)
            units[record["method"]] = _median_units(at)
    return curves, chosen, units


def _tested_points(
    tested: Sequence[dict[str, Any]], curves: dict[str, list[dict[str, Any]]], relative: bool
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, float]]]:
    """Per method with a front in ``curves``: the test-set runs' points, one per seed,
    and their units kept per layer (seed medians). ``relative``: errors as their excess
    over the run's dense network's."""
    chosen = {m: [{"speedup": r["stages"][m]["speedup"],
                   "error": r["stages"][m]["error"]
                   - (r["stages"]["pretrain"]["error"] if relative else 0.0)}
                  for r in tested if m in r["stages"]
                  and (not relative or "pretrain" in r["stages"])] for m in curves}  # fmt: skip
    units = {m: _median_units([r["stages"][m]["active"] or r["stages"][m]["units"]
                               for r in tested if m in r["stages"]])
             for m in sorted({m for r in tested for m in r["stages"]}, key=_rank)
             if m != "pretrain" and m in curves}  # fmt: skip
    return chosen, units


def _front_figures(
    curves: dict[str, list[dict[str, Any]]],
    chosen: dict[str, list[dict[str, Any]]],
    units: dict[str, dict[str, float]],
    dense: float,
    relative: bool,
    tested: Sequence[dict[str, Any]] | None,
    name: str,
    sweeps: Path,
) -> dict[str, Any]:
    """The front figure, and the units figure where there are units, by file stem."""
    from bbdrop import plots

    title = f"validation fronts (stars: {'test set, per seed' if tested else 'chosen'})"
    ylabel = "error (%)"
    if relative:
        title += "\neach error against its own dense network's"
        ylabel = "error minus the dense network's (points)"
    figures = {"front": plots.plot_front(curves, chosen, dense, title, SELECTION_MARGIN, ylabel)}
    if units:  # every figure drawn before the first is written: all or none
        title = "units kept per layer (test-set runs, seed medians)" if tested else ""
        figures["units"] = plots.plot_units_per_layer(units, title, _layer_widths(name, sweeps))
    return figures


def _check_tested(tested: Sequence[dict[str, Any]] | None, name: str, sweeps: Path) -> None:
    """ValueError unless the test-set runs drawn on a front are of the sweeps' experiment
    and gate the same layers."""
    if tested is None:
        return
    names = {r["name"] for r in tested if "name" in r}
    if names - {name}:
        raise ValueError(f"--tested holds runs of {sorted(names)[0]!r}, the sweeps in {sweeps} "
                         f"are of {name!r}; give the reproduce folder of {name!r}")  # fmt: skip
    widths = _layer_widths(name, sweeps)
    layers = {n for r in tested for st in r["stages"].values() for n in st.get("units") or {}}
    if widths is not None and layers - widths.keys():
        raise ValueError(f"--tested holds runs that gate {sorted(layers - widths.keys())[0]!r}, "
                         f"which {name!r} does not have; give the reproduce folder of "
                         f"{name!r}")  # fmt: skip


def _layer_widths(name: str | None, sweeps: Path | None = None) -> dict[str, int] | None:
    """Units of each gated layer before pruning (every method gates the same positions)
    of the network the sweeps in ``sweeps`` trained: the one a run of theirs recorded in
    its config.toml (``model.name`` may have been changed from the experiment's), else
    experiment ``name``'s; None for neither, or a network of the user's own that cannot
    be built here (its module not found from this folder)."""
    cfg = _recorded_config(sweeps) if sweeps is not None else None
    if cfg is None and name in list_experiments():
        cfg = experiment_config(name)
    if cfg is None:
        return None
    if placement(cfg) == "groups":  # placed by tracing the data, which is not read here
        return None  # the figure shows units, not fractions of the widths
    # Gates sit on layer inputs and convolution outputs: the class count changes none.
    try:
        model = stage_model(cfg, cfg.gate.method, num_classes=10)
    except ValueError:
        if not is_factory(cfg.model.name):
            raise
        return None
    return {n: g.gate.num_units for n, g in gated_layers(model)}


def _recorded_config(sweeps: Path) -> RunConfig | None:
    """The configuration the first run of the sweeps in ``sweeps`` recorded, or None
    where there is none that reads (records kept without their runs: docs/sweeps/)."""
    for path in sorted(sweeps.glob("*/x*/seed-*/config.toml"))[:1]:
        try:
            return load_recorded_config(path)
        except (ValueError, OSError):
            return None
    return None


def _median_units(per_seed: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Units kept per layer, the median over seeds."""
    return {n: statistics.median(float(u[n]) for u in per_seed) for n in per_seed[0]}
