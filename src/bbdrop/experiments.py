"""The paper's experiments: shipped configurations, runs over seeds, the table and figures.

``reproduce(name, seeds)`` runs the pipeline once per seed in
``<out>/<name>/seed-<n>/`` (each run resumable), then writes
``<out>/<name>/table.md`` in the paper's layout (rows Original, BB, DBB;
columns error, units per layer, FLOP speedup and memory by both counting rules
of docs/method.md section 5; medians over seeds) and the figures of the first
seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bbdrop import records
from bbdrop.attach import collect_masks, gated_layers
from bbdrop.config import (
    RunConfig,
    apply_overrides,
    load_config,
    load_recorded_config,
    to_dict,
    to_toml,
)
from bbdrop.data import Dataset
from bbdrop.files import check_writable, write_atomic, write_together
from bbdrop.pipeline import (
    COMPACT_EXAMPLES,
    load_data,
    pipeline_stages,
    resolve_device,
    run_pipeline,
    stage_model,
)
from bbdrop.threads import available_cores, machine
from bbdrop.train.checkpoint import load_checkpoint, load_model_state
from bbdrop.train.loop import Progress

__all__ = [
    "SELECTION_MARGIN",
    "experiment_config",
    "list_experiments",
    "markdown_table",
    "reproduce",
    "select_scale",
    "sweep",
    "write_figures",
    "write_front",
]

# Table rows: the dense network, the sparsification stage (named by its method), DBB.
ROW_NAMES = {"pretrain": "Original"}  # the others: the method's name in capitals
FIGURE_NAMES = ("training-curves", "input-masks", "mask-correlations", "example-masks")
FIGURES = (  # medians over seeds; the keys of a stage's results (bbdrop.metrics.paper_figures)
    "error",
    "speedup",
    "speedup_authors",
    "memory_authors",
    "memory_params_authors",
    "seconds_per_epoch",
)


def list_experiments() -> list[str]:
    """Names of the shipped configurations (``bbdrop/configs/*.toml``)."""
    files = resources.files("bbdrop") / "configs"
    return sorted(p.name.removesuffix(".toml") for p in files.iterdir() if p.name.endswith(".toml"))


def experiment_config(name_or_path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """A shipped experiment by name, or a TOML file by path, with overrides applied."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return load_config(path, overrides)
    if name_or_path not in list_experiments():
        raise ValueError(
            f"unknown experiment {name_or_path!r}; shipped: {', '.join(list_experiments())} "
            "(or give the path of a .toml file)"
        )
    with resources.as_file(resources.files("bbdrop") / "configs" / f"{name_or_path}.toml") as p:
        return load_config(p, overrides)


# The paper's row order; a run's stages are listed in this order in the table.
METHOD_ORDER = ("svd", "ssl", "sbp", "l0", "vib", "bb", "dbb")


@dataclass(frozen=True)
class _Run:
    """One run of a reproduction: a configuration, its folder, the stages to run."""

    cfg: RunConfig
    folder: Path
    stages: tuple[str, ...] | None = None  # None: all

    @property
    def label(self) -> int:
        return self.cfg.seed


def reproduce(
    name: str,
    seeds: Sequence[int],
    out_root: str | Path = "runs",
    overrides: Sequence[str] = (),
    *,
    data: Dataset | None = None,
    progress: Callable[[int], Progress] | None = None,
    figures: bool = True,
    jobs: int = 1,
    methods: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ``name`` for each seed, then write the table (and figures); return both.

    ``progress(seed)`` gives the per-epoch callback of that seed's run. ``jobs``
    runs that many runs at once, each in its own process, with the threads
    (``threads``, or every available core) divided among them; a failing run
    lets the running ones finish (each is resumable), then its error is raised.

    ``methods`` (e.g. ``["sbp", "l0", "bb", "dbb"]``) compares sparsification
    methods from the same pretrained network: each method runs in
    ``<out>/<name>/<method>/seed-<n>/`` with the shipped configuration
    ``<name>-<method>`` where there is one (its tuned settings), else ``name``
    with ``gate.method`` set; ``bb`` and ``dbb`` share one run (pretrain, BB, DBB).
    The network is pretrained once per seed and its checkpoint copied to the
    other methods' folders (when their pretraining settings are the same; a
    method whose are not pretrains its own). The table has one row per method,
    in the paper's order.
    """
    _check_seeds_and_jobs(seeds, jobs)
    base = experiment_config(name, overrides)
    out = Path(out_root) / base.name
    plans = _method_plans(name, base, overrides, methods, out)  # every config valid first
    _check_outputs_of(out, ["table.md", "summary.json",
                            *(f"{f}{s}" for f in FIGURE_NAMES for s in (".png", ".pdf"))])
    first_cfg, first_root = next(iter(plans.values()))
    for seed in seeds:  # an earlier call's methods pretrained this network already
        _borrow_stages(out, f"*/seed-{seed}", apply_overrides(first_cfg, [f"seed={seed}"]),
                       first_root / f"seed-{seed}")  # fmt: skip
    given = data is not None  # a dataset given by the caller goes to every run
    if data is None:
        data = load_data(base)
    by_run = _run_plans(plans, seeds, data, given, progress, jobs, base.threads)
    combined = [_combine([by_run[key, seed] for key in plans]) for seed in seeds]
    table = markdown_table(combined, f"{base.name}, seeds {' '.join(map(str, seeds))}")
    summary = json.dumps(summarize(combined), indent=2) + "\n"
    write_together({out / "table.md": table.encode("utf-8"),
                    out / "summary.json": summary.encode("utf-8")})  # fmt: skip
    paths: list[str] = []
    if figures:
        cfg, root = plans["bb"] if "bb" in plans else next(iter(plans.values()))
        # with data.validation the figures too use the held-out examples, not the test set
        shown = data.hold_out(base.data.validation) if base.data.validation else data
        seed = seeds[0]
        folder = root / f"seed-{seed}"
        paths = [str(p) for p in write_figures(apply_overrides(cfg, [f"seed={seed}"]), folder,
                                               shown, out)]  # fmt: skip
    return {"runs": combined, "table": table, "figures": paths}


def _check_outputs_of(folder: Path, names: Sequence[str]) -> None:
    """ValueError, before any training, when a file a command writes at its end could not
    be written (a folder in its place, a file above it)."""
    for name in names:
        check_writable(folder / name)


def _check_seeds_and_jobs(seeds: Sequence[int], jobs: int) -> None:
    """ValueError unless ``seeds`` are distinct integers, at least one, and ``jobs`` >= 1."""
    if isinstance(seeds, (str, bytes)) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in seeds
    ):
        raise ValueError(f"seeds must be a list of integers, got {seeds!r}")
    if not seeds:
        raise ValueError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {', '.join(map(str, seeds))}; give each seed once")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")


# The selection rule, fixed before any test run (docs/baselines.md, "Tuning"): the
# scale with the highest median validation FLOP speedup whose median validation
# error is at most the dense network's median validation error plus this margin.
SELECTION_MARGIN = 0.5  # percentage points


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
    root = Path(out_root) / base.name / "sweep" / method
    (cfg, _), = _method_plans(name, base, [*overrides, f"data.validation={validation}"],
                              [method], root).values()  # fmt: skip
    records.read_sweeps(root.parent, name=base.name)  # the front reads them all: check first
    _check_outputs_of(root, ["sweep.json", "chosen.toml"])
    _check_outputs_of(root.parent, [f"{f}{s}" for f in ("front", "units")
                                    for s in (".png", ".pdf")])  # fmt: skip
    scale_of = {scale_name(x): float(x) for x in scales}
    plans = {key: (_scaled(cfg, method, x), root / key) for key, x in scale_of.items()}
    for seed in seeds:  # every sweep of the experiment starts from one pretrained network
        for plan_cfg, folder in plans.values():  # and any scale from a BB run it matches
            seeded = apply_overrides(plan_cfg, [f"seed={seed}"])
            _borrow_stages(root.parent, f"*/x*/seed-{seed}", seeded, folder / f"seed-{seed}")
    given = data is not None
    if data is None:
        data = load_data(base)
    by_run = _run_plans(plans, seeds, data, given, progress, jobs, base.threads)
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
    chosen = select_scale(points)
    record = {"name": base.name, "method": method, "validation": validation,
              "machine": machine(), "torch": torch.__version__,
              "rule": f"highest median validation speedup with median validation error <= "
                      f"median dense validation error + {SELECTION_MARGIN}",
              "chosen_scale": chosen, "points": points}  # fmt: skip
    best = apply_overrides(_scaled(cfg, method, chosen), ["data.validation=0"])
    write_together({root / "sweep.json": (json.dumps(record, indent=2) + "\n").encode(),
                    root / "chosen.toml": to_toml(best).encode()})  # fmt: skip
    front = write_front(Path(out_root) / base.name / "sweep")
    return {"record": record, "chosen": best, "figures": front}


def scale_name(scale: float) -> str:
    """The folder of a sweep's scale: ``x`` and the value, as short as ``{:g}`` where that
    keeps it exactly (``x0.3``, ``x10``), else every digit (``x1.0000001``)."""
    short = f"{scale:g}"
    return f"x{short}" if float(short) == scale else f"x{float(scale)!r}"


def _check_scales(scales: Sequence[float]) -> None:
    """ValueError unless ``scales`` are distinct finite numbers > 0."""
    if isinstance(scales, (str, bytes)) or not scales or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
        for x in scales
    ):
        raise ValueError(f"scales must be finite numbers > 0, got {scales!r}")
    if len({float(x) for x in scales}) != len(scales):
        raise ValueError(f"scales repeat: {', '.join(map(repr, scales))}; give each scale once")


def _borrow_stages(root: Path, pattern: str, cfg: RunConfig, folder: Path) -> None:
    """Copy into ``folder`` the finished stages of another run under ``root`` (its folders
    matching ``pattern``) that are the same computation as ``cfg``'s: its pretrained
    network, and its BB checkpoint when BB too is the same (settings, and a byte-identical
    pretrained network). Stages ``folder`` has are kept. So every sweep and every method
    of an experiment starts from one pretrained network, trained once, and a sweep of
    DBB's weight starts from the BB of the BB sweep's matching point."""
    for stage, same in (("pretrain", _same_pretraining), ("bb", _same_bb)):
        target = folder / f"{stage}.pt"
        if target.exists():
            continue
        for source in sorted(root.glob(f"{pattern}/{stage}.pt")):
            if source.parent.resolve() == folder.resolve():
                continue
            try:
                other = load_recorded_config(source.parent / "config.toml")
            except (OSError, ValueError):  # no readable record of how it was trained
                continue
            if other.seed != cfg.seed or not same(other, cfg):
                continue
            if stage != "pretrain" and not _same_bytes(source.parent / "pretrain.pt",
                                                       folder / "pretrain.pt"):  # fmt: skip
                continue
            _copy_checkpoint(source, target)
            break


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether files ``a`` and ``b`` both exist and hold the same bytes."""
    return a.exists() and b.exists() and a.read_bytes() == b.read_bytes()


def _copy_checkpoint(source: Path, target: Path) -> None:
    """A finished stage's checkpoint copied to another run's folder (written atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, source.read_bytes())


def _scaled(cfg: RunConfig, method: str, scale: float) -> RunConfig:
    """``cfg`` with its regulariser weight multiplied by ``scale``."""
    g = cfg.gate
    if method == "dbb":
        return apply_overrides(cfg, [f"gate.dbb_kl_scale={g.dbb_kl_scale * scale!r}"])
    changes = [f"gate.kl_scale={g.kl_scale * scale!r}"]
    if g.conv_kl_scale is not None:
        changes.append(f"gate.conv_kl_scale={g.conv_kl_scale * scale!r}")
    changes += [f"gate.layer_kl_scale.{n}={v * scale!r}" for n, v in g.layer_kl_scale.items()]
    return apply_overrides(cfg, changes)


def select_scale(points: Sequence[dict[str, Any]]) -> float:
    """The scale the selection rule chooses from a sweep's points (medians over seeds);
    when no scale is within the margin, the one with the lowest median error."""
    by_scale: dict[float, list[dict[str, Any]]] = {}
    for p in points:
        by_scale.setdefault(p["scale"], []).append(p)
    med = {x: {k: statistics.median(p[k] for p in ps) for k in ("error", "speedup", "dense_error")}
           for x, ps in by_scale.items()}  # fmt: skip
    allowed = [x for x, m in med.items() if m["error"] <= m["dense_error"] + SELECTION_MARGIN]
    if allowed:
        return max(allowed, key=lambda x: (med[x]["speedup"], -med[x]["error"]))
    return min(med, key=lambda x: med[x]["error"])


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
    # Sweeps from different pretrained networks (e.g. made on different machines) are
    # compared by their error above their own dense network's.
    seeds = {p["seed"] for r in records_ for p in r["points"]}
    relative = any(
        len({p["dense_error"] for r in records_ for p in r["points"] if p["seed"] == seed}) > 1
        for seed in seeds
    )
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
    dense = 0.0 if relative else statistics.median(
        p["dense_error"] for r in records_ for p in r["points"])  # fmt: skip
    if tested is not None:
        chosen = {m: [{"speedup": r["stages"][m]["speedup"],
                       "error": r["stages"][m]["error"]
                       - (r["stages"]["pretrain"]["error"] if relative else 0.0)}
                      for r in tested if m in r["stages"]
                      and (not relative or "pretrain" in r["stages"])] for m in curves}  # fmt: skip
        units = {m: _median_units([r["stages"][m]["active"] or r["stages"][m]["units"]
                                   for r in tested if m in r["stages"]])
                 for m in sorted({m for r in tested for m in r["stages"]}, key=_rank)
                 if m != "pretrain" and m in curves}  # fmt: skip
    title = f"validation fronts (stars: {'test set, per seed' if tested else 'chosen'})"
    ylabel = "error (%)"
    if relative:
        title += "\neach error against its own dense network's"
        ylabel = "error minus the dense network's (points)"
    out = sweeps_dir if out is None else Path(out)
    for stem in ("front", "units"):  # every path checked before the first is written
        for suffix in (".png", ".pdf"):
            check_writable(out / f"{prefix}{stem}{suffix}")
    figures = {"front": plots.plot_front(curves, chosen, dense, title, SELECTION_MARGIN, ylabel)}
    if units:  # every figure drawn before the first is written: all or none
        title = "units kept per layer (test-set runs, seed medians)" if tested else ""
        figures["units"] = plots.plot_units_per_layer(units, title, _layer_widths(name))
    return [path for stem, fig in figures.items()
            for path in plots.save_figure(fig, out / f"{prefix}{stem}")]  # fmt: skip


def _check_tested(tested: Sequence[dict[str, Any]] | None, name: str, sweeps: Path) -> None:
    """ValueError unless the test-set runs drawn on a front are of the sweeps' experiment
    and gate the same layers."""
    if tested is None:
        return
    names = {r["name"] for r in tested if "name" in r}
    if names - {name}:
        raise ValueError(f"--tested holds runs of {sorted(names)[0]!r}, the sweeps in {sweeps} "
                         f"are of {name!r}; give the reproduce folder of {name!r}")  # fmt: skip
    widths = _layer_widths(name)
    layers = {n for r in tested for st in r["stages"].values() for n in st.get("units") or {}}
    if widths is not None and layers - widths.keys():
        raise ValueError(f"--tested holds runs that gate {sorted(layers - widths.keys())[0]!r}, "
                         f"which {name!r} does not have; give the reproduce folder of "
                         f"{name!r}")  # fmt: skip


def _layer_widths(name: str | None) -> dict[str, int] | None:
    """Units of each gated layer of experiment ``name``'s network before pruning (every
    method gates the same positions), or None for a name that is not an experiment."""
    if name not in list_experiments():
        return None
    cfg = experiment_config(name)
    # Gates sit on layer inputs and convolution outputs: the class count changes none.
    model = stage_model(cfg, cfg.gate.method, num_classes=10)
    return {n: g.gate.num_units for n, g in gated_layers(model)}


def _median_units(per_seed: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Units kept per layer, the median over seeds."""
    return {n: statistics.median(float(u[n]) for u in per_seed) for n in per_seed[0]}


def tested_runs(folder: str | Path) -> list[dict[str, Any]]:
    """The runs of every seed in a ``reproduce`` output folder (``<out>/<name>``), each
    seed's methods combined, read back from their ``results.json`` and checked
    (:func:`bbdrop.records.read_results`: one experiment, no stage twice, every figure
    a finite number)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give the folder bbdrop reproduce wrote, "
                         "<out>/<experiment>")  # fmt: skip
    by_seed = records.read_results(folder)
    if not by_seed:
        raise ValueError(
            f"{folder} holds no results (seed-*/results.json or */seed-*/results.json); give "
            "the folder bbdrop reproduce wrote, <out>/<experiment>"
        )
    return [_combine([r for _, r in by_seed[s]]) for s in sorted(by_seed)]


def _run_plans(
    plans: dict[str, tuple[RunConfig, Path]],
    seeds: Sequence[int],
    data: Dataset,
    given: bool,
    progress: Callable[[int], Progress] | None,
    jobs: int,
    threads: int,
) -> dict[tuple[str, int], dict[str, Any]]:
    """The results of every plan (a configuration and the root of its seed folders) for
    every seed, keyed (plan, seed). With several plans the network is pretrained once
    per seed, in the first plan's folder, and its checkpoint copied to the others whose
    pretraining settings are the same; likewise the BB stage, for plans that differ
    only in the DBB stage (a sweep of DBB's weight)."""
    runs = {(key, seed): _Run(apply_overrides(cfg, [f"seed={seed}"]), root / f"seed-{seed}")
            for key, (cfg, root) in plans.items() for seed in seeds}  # fmt: skip
    sent = data if given or jobs == 1 else None  # workers load the data themselves
    cap = max(1, (threads or available_cores()) // min(jobs, len(runs)))
    first = next(iter(plans))
    for stage, same in (("pretrain", _same_pretraining), ("bb", _same_bb)):
        sharing = {(key, seed) for (key, seed), run in runs.items()
                   if key != first and same(runs[first, seed].cfg, run.cfg)}  # fmt: skip
        if not sharing:
            continue
        done = [dataclasses.replace(runs[first, s], stages=(stage,)) for s in seeds]
        _run_all(done, sent, progress, jobs, cap)
        for (key, seed), run in runs.items():
            target = run.folder / f"{stage}.pt"
            if (key, seed) in sharing and not target.exists():
                _copy_checkpoint(runs[first, seed].folder / f"{stage}.pt", target)
    results = _run_all(list(runs.values()), sent, progress, jobs, cap)
    return dict(zip(runs, results, strict=True))


def _method_plans(
    name: str,
    base: RunConfig,
    overrides: Sequence[str],
    methods: Sequence[str] | None,
    out: Path,
) -> dict[str, tuple[RunConfig, Path]]:
    """Per run group, its configuration and the root of its seed folders."""
    if methods is None:
        return {base.gate.method: (base, out)}
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list of names, got {methods!r}")
    from bbdrop.gates import list_gates

    unknown = [m for m in methods if m not in list_gates()]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; available: {', '.join(list_gates())}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods repeat: {', '.join(methods)}; give each once")
    plans: dict[str, tuple[RunConfig, Path]] = {}
    for method in sorted({"bb" if m == "dbb" else m for m in methods}, key=_rank):
        tuned = f"{name}-{method}"
        if tuned in list_experiments():
            cfg = experiment_config(tuned, overrides)
        else:
            cfg = apply_overrides(base, [f"gate.method={method}"])
        dbb = cfg.epochs.dbb if method == "bb" and "dbb" in methods else 0
        cfg = apply_overrides(cfg, [f"epochs.dbb={dbb}", f"name={base.name}"])
        pipeline_stages(cfg)  # a table that cannot run fails now
        plans[method] = (cfg, out / method)
    return plans


def _same_pretraining(a: RunConfig, b: RunConfig) -> bool:
    """Whether the pretraining stage of ``a`` and ``b`` is the same computation (the
    settings of the later stages aside)."""

    def pretraining(cfg: RunConfig) -> dict[str, Any]:
        d = to_dict(cfg)
        for key in ("name", "gate", "seed"):
            d.pop(key)
        d["epochs"] = d["epochs"]["pretrain"]
        for key in ("gate_lr", "decay_gates"):  # the gates' optimiser: no gates yet
            d["optim"].pop(key)
        return d

    return pretraining(a) == pretraining(b)


def _same_bb(a: RunConfig, b: RunConfig) -> bool:
    """Whether ``a`` and ``b`` run BB and their stages up to BB's end are the same
    computation (they differ only in the DBB stage's settings or length, as in a sweep
    of DBB's weight): then the BB checkpoint of one serves the other."""

    def through_bb(cfg: RunConfig) -> dict[str, Any]:
        d = to_dict(cfg)
        for key in ("name", "seed"):
            d.pop(key)
        d["gate"].pop("dbb_kl_scale")
        d["epochs"].pop("dbb")
        return d

    return all(c.gate.method == "bb" for c in (a, b)) and through_bb(a) == through_bb(b)


def _combine(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One seed's results of every method as one run: stages in the paper's order, and
    the experiment's name where the results record it."""
    stages: dict[str, Any] = {}
    for r in results:
        stages.update(r["stages"])
    combined: dict[str, Any] = {"stages": {s: stages[s] for s in sorted(stages, key=_rank)}}
    names = records.names_of(results)
    if names:
        combined["name"] = min(names)
    return combined


def _rank(stage: str) -> int:
    """A stage's place in the paper's order (methods it does not have: before BB)."""
    order = ("pretrain", *METHOD_ORDER[:-2], "", *METHOD_ORDER[-2:], "preprune")
    return order.index(stage if stage in order else "")


def _run_all(
    runs: Sequence[_Run],
    data: Dataset | None,
    progress: Callable[[int], Progress] | None,
    jobs: int,
    cap: int,
) -> list[dict[str, Any]]:
    """Every run's results, in order: one after the other, or ``jobs`` at a time."""
    if jobs == 1:
        return [
            run_pipeline(r.cfg, r.folder, data, stages=r.stages, max_threads=cap,
                         progress=progress(r.label) if progress is not None else None)
            for r in runs
        ]  # fmt: skip
    return _run_in_processes(runs, data, progress, min(jobs, len(runs)), cap)


def _run_seed(job: tuple[_Run, Dataset | None, int], send: Callable[[Any], None]) -> dict[str, Any]:
    """One run, ``job = (run, data, max_threads)``, in a worker process of
    :func:`bbdrop.workers.run_all`; its progress goes back to the parent through ``send``."""
    run, data, max_threads = job

    def report(stage: str, record: Any, epochs: int) -> None:
        send((stage, record, epochs))

    return run_pipeline(
        run.cfg, run.folder, data, stages=run.stages, progress=report, max_threads=max_threads
    )


def _run_in_processes(
    runs: Sequence[_Run],
    data: Dataset | None,
    progress: Callable[[int], Progress] | None,
    jobs: int,
    max_threads: int,
) -> list[dict[str, Any]]:
    """The results of ``runs``, ``jobs`` at a time in spawned processes that end with
    this one (bbdrop.workers: Ctrl-C or SIGTERM stops them, a killed parent takes them
    along); a run that fails lets the others running finish and starts no other."""
    from bbdrop.workers import run_all

    callbacks = {r.label: progress(r.label) for r in runs} if progress is not None else {}

    def deliver(index: int, update: tuple[str, Any, int]) -> None:
        label = runs[index].label
        if label in callbacks:
            callbacks[label](*update)

    return run_all(_run_seed, [(r, data, max_threads) for r in runs], jobs, on_message=deliver,
                   labels=[r.label for r in runs], what="seeds")  # fmt: skip


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Medians over seeds of each row's figures (rows: the trained stages but pre-pruning,
    of any run: a method run on fewer seeds than the others is a median of those)."""
    out: dict[str, dict[str, Any]] = {}
    stages = sorted(dict.fromkeys(s for r in runs for s in r["stages"] if s != "preprune"),
                    key=_rank)  # fmt: skip
    for stage in stages:
        results = [r["stages"][stage] for r in runs if stage in r["stages"]]
        units_of = "active" if results[0]["active"] else "units"
        names = list(results[0][units_of] or results[0]["units"])
        row: dict[str, Any] = {"stage": stage, "seeds": len(results)}
        row["units"] = {
            n: statistics.median(float((r[units_of] or r["units"]).get(n, 0)) for r in results)
            for n in names
        }
        row["active"] = units_of == "active"
        row["at_chance"] = sum(bool(r.get("at_chance")) for r in results)
        row.update({k: statistics.median(r[k] for r in results) for k in FIGURES})
        # the dense network is its own compacted network, measured or not
        measured = [1.0 if stage == "pretrain" else _measured_speedup(r) for r in results]
        row["speedup_measured"] = (
            statistics.median(measured) if None not in measured else None
        )  # results written before bbdrop measured them have none
        out[ROW_NAMES.get(stage, stage.upper())] = row
    return out


def _measured_speedup(result: dict[str, Any]) -> float | None:
    """A stage's measured wall-clock speedup of its compacted network over the dense one
    (1 for a stage without gates; None where it was not measured or could not be)."""
    if "compact" not in result:
        return None
    compact = result["compact"]
    if compact is None:
        return 1.0
    return compact.get("speedup_measured")


def markdown_table(runs: Sequence[dict[str, Any]], title: str = "") -> str:
    """The paper's layout: rows Original, the method, DBB; medians over the runs."""
    rows = summarize(runs)
    most = max((fig["seeds"] for fig in rows.values()), default=0)
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "| | error (%) | units per layer | speedup, masks | speedup, authors' count | "
        "speedup, measured | memory (%), params | memory (%), im2col | s / epoch |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row, fig in rows.items():
        units = "-".join(f"{v:.0f}" for v in fig["units"].values()) or "all"
        chance = f" (at chance: {fig['at_chance']} of {fig['seeds']})" if fig["at_chance"] else ""
        fewer = f" ({fig['seeds']} of {most} seeds)" if fig["seeds"] < most else ""
        active = " active" if fig["active"] else ""
        x = fig["speedup_measured"]
        measured = "-" if x is None else f"{x:.2f}x"
        lines.append(
            f"| {row}{fewer} | {fig['error']:.2f}{chance} | {units}{active} | "
            f"{fig['speedup']:.2f}x | {fig['speedup_authors']:.2f}x | {measured} | "
            f"{100 * fig['memory_params_authors']:.1f} | {100 * fig['memory_authors']:.1f} | "
            f"{fig['seconds_per_epoch']:.1f} |"
        )
    lines += [
        "",
        "Units: kept per gated layer (DBB: average active per test example). FLOP speedup "
        "by exact keep masks and by the authors' independent per-layer counts; memory by the "
        "authors' counts, as a plain parameter ratio and with the im2col buffers "
        "(docs/method.md section 5). Measured: wall clock of the dense network over the "
        "compacted one (bbdrop.compact; DBB with its masks, not skipping) at a batch of 256 "
        "test images on the run's threads, both timed in one measurement (- : not "
        "measured, results from before bbdrop did). Medians over seeds. "
        '"at chance": seeds whose error is not clearly below always answering the most '
        "frequent class; their speedups mean nothing.",
    ]
    return "\n".join(lines) + "\n"


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
    model = stage_model(cfg, stage, data.num_classes).to(device)
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


# -- physical pruning of a finished run ----------------------------------------------
def load_stage(
    run_dir: str | Path, stage: str | None = None, data: Dataset | None = None
) -> tuple[RunConfig, str, torch.nn.Module, Dataset]:
    """The configuration, stage name, trained network (eval mode) and data of ``stage``
    of the run in ``run_dir`` (default: its last finished stage with gates)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.toml); give the folder "
                         "bbdrop run or reproduce wrote, e.g. runs/NAME/seed-1")  # fmt: skip
    cfg = load_recorded_config(run_dir / "config.toml")
    names = [s.name for s in pipeline_stages(cfg)]
    finished = [n for n in names if (run_dir / f"{n}.pt").is_file()]
    if stage is None:
        gated = [n for n in finished if n != "pretrain"]
        if not gated:
            raise ValueError(f"{run_dir} has no finished stage with gates yet (stages: "
                             f"{', '.join(names)}); train one first")  # fmt: skip
        stage = gated[-1]
    elif stage not in names:
        raise ValueError(f"unknown stage {stage!r}; stages of {cfg.name!r}: {', '.join(names)}")
    elif stage not in finished:
        raise ValueError(f"stage {stage!r} has not finished in {run_dir} (no {stage}.pt)")
    data = load_data(cfg) if data is None else data
    model = stage_model(cfg, stage, data.num_classes)
    path = run_dir / f"{stage}.pt"
    load_model_state(model, load_checkpoint(path), path)
    return cfg, stage, model.eval(), data


def compact_run(
    run_dir: str | Path,
    stage: str | None = None,
    out: str | Path | None = None,
    onnx: str | Path | None = None,
    round_to: int = 1,
) -> dict[str, Any]:
    """Compact ``stage`` of the run in ``run_dir`` (default: its last finished stage
    with gates; widths rounded up to multiples of ``round_to``, see
    :func:`bbdrop.compact`) and write it with :func:`bbdrop.save_compact` to ``out``
    (default: ``<run_dir>/<stage>.compact.safetensors``), and as ONNX to ``onnx`` if given.

    Everything is checked and both files are made in memory before the first is
    written: the paths (suffixes, ``out`` not ``onnx``, no file replaced that is not
    a compact file or an ONNX model), the extras, the network, its export. Returns
    what was done: the stage, the files, the units per gated layer before and after,
    the parameter counts, and the largest output difference to the gated network on
    the first training examples."""
    from bbdrop import export
    from bbdrop.attach import gated_layers, units_kept
    from bbdrop.compaction import compact, inference_parameters
    from bbdrop.metrics import count_parameters

    export.check_export_extras(onnx=onnx is not None)
    cfg, stage, model, data = load_stage(run_dir, stage)
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else run_dir / f"{stage}.compact.safetensors"
    _check_outputs(target, None if onnx is None else Path(onnx))
    if not list(gated_layers(model)):
        raise ValueError(f"stage {stage!r} has no gates: nothing to compact; pick a later stage")
    example = data.train_x[:COMPACT_EXAMPLES].float()
    small = compact(model, example, round_to=round_to)
    with torch.no_grad():
        difference = float((small(example) - model(example)).abs().max())
    blobs = {} if onnx is None else {Path(onnx): export.onnx_bytes(small, example[:2])}
    blobs[target] = export.compact_bytes(small, cfg.model.name, data.num_classes)
    write_together(blobs)  # the ONNX first: a place that refuses it leaves no trace in the run
    return {
        "stage": stage,
        "files": list(blobs),
        "units": units_kept(model),
        "widths": _gated_widths(model, small),
        "parameters": count_parameters(model, include_gates=False),
        "parameters_compact": inference_parameters(small),
        "max_difference": difference,
        "examples": len(example),
    }


def _check_outputs(target: Path, onnx: Path | None) -> None:
    """ValueError unless the compact file and the ONNX file can be written without
    replacing anything that is not one of their kind (a checkpoint, a configuration,
    each other)."""
    from bbdrop import export

    if onnx is not None and os.path.abspath(onnx) == os.path.abspath(target):
        raise ValueError(f"--out and --onnx are the same file {str(target)!r}; give the ONNX "
                         "file its own name, e.g. net.onnx")  # fmt: skip
    export.check_compact_path(target)
    if onnx is not None:
        export.check_onnx_path(onnx)


def _gated_widths(gated: torch.nn.Module, small: torch.nn.Module) -> dict[str, int]:
    """Units left, per gated layer of ``gated``, on the gate's side in ``small``."""
    from bbdrop.attach import gated_layers

    modules = dict(small.named_modules())
    widths = {}
    for name, g in gated_layers(gated):
        layer = modules[name]
        if isinstance(layer, torch.nn.Sequential):
            layer = next(m for m in layer if isinstance(m, torch.nn.Linear | torch.nn.Conv2d))
        if g.side == "input":
            widths[name] = layer.in_features if hasattr(layer, "in_features") else layer.in_channels
        else:
            widths[name] = getattr(layer, "out_features", None) or layer.out_channels
    return widths
