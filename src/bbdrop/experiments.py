"""The paper's experiments: shipped configurations, runs over seeds, the table and figures.

``reproduce(name, seeds)`` runs the pipeline once per seed in
``<out>/<name>/seed-<n>/`` (each run resumable), then writes
``<out>/<name>/table.md`` in the paper's layout (rows Original, BB, DBB;
columns error, units per layer, FLOP speedup, memory; medians over seeds)
and the figures of the first seed.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bbdrop.attach import collect_masks
from bbdrop.config import RunConfig, apply_overrides, load_config
from bbdrop.pipeline import Data, resolve_device, run_pipeline, stage_model
from bbdrop.train.checkpoint import load_checkpoint
from bbdrop.train.loop import Progress

__all__ = [
    "experiment_config",
    "list_experiments",
    "markdown_table",
    "reproduce",
    "write_figures",
]

ROWS = (("Original", "pretrain"), ("BB", "bb"), ("DBB", "dbb"))


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


def reproduce(
    name: str,
    seeds: Sequence[int],
    out_root: str | Path = "runs",
    overrides: Sequence[str] = (),
    *,
    data: Data | None = None,
    transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    progress: Callable[[int], Progress] | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Run ``name`` for each seed, then write the table (and figures); return both.

    ``progress(seed)`` gives the per-epoch callback of that seed's run.
    """
    if not seeds:
        raise ValueError("give at least one seed")
    base = experiment_config(name, overrides)
    out = Path(out_root) / base.name
    if data is None:
        from bbdrop.data import load_dataset

        data = load_dataset(base.data.name, data_dir=base.data.data_dir,
                            download=base.data.download)  # fmt: skip
        transform = getattr(data, "train_transform", None)
    runs = []
    for seed in seeds:
        cfg = apply_overrides(base, [f"seed={seed}"])
        cb = progress(seed) if progress is not None else None
        runs.append(run_pipeline(cfg, out / f"seed-{seed}", data, progress=cb, transform=transform))
    table = markdown_table(runs, f"{base.name}, seeds {' '.join(map(str, seeds))}")
    (out / "table.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summarize(runs), indent=2) + "\n")
    paths: list[str] = []
    if figures:
        first = apply_overrides(base, [f"seed={seeds[0]}"])
        paths = [str(p) for p in write_figures(first, out / f"seed-{seeds[0]}", data, out)]
    return {"runs": runs, "table": table, "figures": paths}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Medians over seeds of each row's figures."""
    out: dict[str, dict[str, Any]] = {}
    for row, stage in ROWS:
        results = [r["stages"][stage] for r in runs if stage in r["stages"]]
        if not results:
            continue
        units_of = "active" if stage == "dbb" and results[0]["active"] else "units"
        names = list(results[0][units_of] or results[0]["units"])
        out[row] = {
            "stage": stage,
            "seeds": len(results),
            "error": statistics.median(r["error"] for r in results),
            "units": {
                n: statistics.median(float((r[units_of] or r["units"]).get(n, 0)) for r in results)
                for n in names
            },
            "speedup": statistics.median(r["speedup"] for r in results),
            "memory": statistics.median(r["memory"] for r in results),
            "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in results),
        }
    return out


def markdown_table(runs: Sequence[dict[str, Any]], title: str = "") -> str:
    """The paper's layout: rows Original, BB, DBB; medians over the runs."""
    rows = summarize(runs)
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "| | error (%) | units per layer | FLOP speedup | memory (%) | s / epoch |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row, fig in rows.items():
        units = "-".join(f"{v:.0f}" for v in fig["units"].values()) or "all"
        lines.append(
            f"| {row} | {fig['error']:.2f} | {units} | {fig['speedup']:.2f}x | "
            f"{100 * fig['memory']:.1f} | {fig['seconds_per_epoch']:.1f} |"
        )
    lines += [
        "",
        "Units: kept per gated layer (DBB: average active per test example). Speedup and "
        "memory: the paper's accounting (SPEC.md section 4). Medians over seeds.",
    ]
    return "\n".join(lines) + "\n"


def write_figures(cfg: RunConfig, run_dir: Path, data: Data, out: Path) -> list[Path]:
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
    model.load_state_dict(load_checkpoint(run_dir / f"{stage}.pt", map_location=device)["model"])
    x, y = data.test_x.to(device), data.test_y.cpu()
    masks = collect_masks(model, x)
    first, first_masks = next(iter(masks.items()))
    averages = {n: plots.class_average_masks(m, y, data.num_classes) for n, m in masks.items()}
    if first_masks.shape[1] == 784:  # an MLP on 28x28 images: the paper's Fig. 1
        fig = plots.plot_input_masks(averages[first], (28, 28), f"{cfg.name}: DBB, input layer")
        written += plots.save_figure(fig, out / "input-masks")
    corr = {n: plots.class_correlations(a) for n, a in averages.items()}
    written += plots.save_figure(plots.plot_correlations(corr, f"{cfg.name}: DBB"),
                                 out / "mask-correlations")  # fmt: skip
    written += plots.save_figure(plots.plot_example_masks(masks, y, 10, f"{cfg.name}: DBB"),
                                 out / "example-masks")  # fmt: skip
    return written
