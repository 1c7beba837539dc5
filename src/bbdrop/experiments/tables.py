"""The tables: medians over seeds of each stage's figures (``summarize``), the paper's
markdown table of them, and the runs of a finished reproduction read back from its
folder (``tested_runs``)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bbdrop import records

from .order import _combine, _rank

# Table rows: the dense network, the sparsification stage (named by its method), DBB.
ROW_NAMES = {"pretrain": "Original"}  # the others: the method's name in capitals
FIGURES = (  # medians over seeds; the keys of a stage's results (bbdrop.metrics.paper_figures)
    "error",
    "speedup",
    "speedup_authors",
    "memory_authors",
    "memory_params_authors",
    "seconds_per_epoch",
)


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
        row.update({k: _median(r[k] for r in results) for k in FIGURES})
        # the dense network is its own compacted network, measured or not
        measured = [1.0 if stage == "pretrain" else _measured_speedup(r) for r in results]
        row["speedup_measured"] = (
            statistics.median(measured) if None not in measured else None
        )  # results written before bbdrop measured them have none
        out[ROW_NAMES.get(stage, stage.upper())] = row
    return out


def _median(values: Iterable[float | None]) -> float | None:
    """The median, or None where a value is None (a figure the run's network has not:
    the authors' count of a network the paper's accounting does not cover)."""
    values = list(values)
    return None if None in values else statistics.median(values)  # type: ignore[type-var]


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
        authors = "-" if fig["speedup_authors"] is None else f"{fig['speedup_authors']:.2f}x"
        params, im2col = ("-" if fig[k] is None else f"{100 * fig[k]:.1f}"
                          for k in ("memory_params_authors", "memory_authors"))  # fmt: skip
        lines.append(
            f"| {row}{fewer} | {fig['error']:.2f}{chance} | {units}{active} | "
            f"{fig['speedup']:.2f}x | {authors} | {measured} | {params} | {im2col} | "
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
