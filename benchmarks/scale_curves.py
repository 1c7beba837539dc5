"""The measured strength-to-size curves of every method: docs/figures/scale-to-speedup-*.png.

Reads the sweeps shipped in docs/sweeps/<experiment>/<method>/sweep.json (validation
errors and FLOP speedups of each method at 0.1x to 10x its reference weight) and
draws, per experiment, FLOP speedup against strength (:func:`bbdrop.plots.plot_scale_curves`)::

    python benchmarks/scale_curves.py
"""

from __future__ import annotations

import json
from pathlib import Path

from bbdrop.plots import plot_scale_curves, save_figure

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    for experiment in sorted(p for p in (DOCS / "sweeps").iterdir() if p.is_dir()):
        sweeps = {}
        for path in sorted(experiment.glob("*/sweep.json")):
            record = json.loads(path.read_text())
            # one point per scale: the first seed's (the shipped sweeps ran seed 1)
            points = {p["scale"]: p for p in record["points"]}
            sweeps[record["method"]] = list(points.values())
        fig = plot_scale_curves(sweeps, f"{experiment.name}: strength against size")
        for out in save_figure(fig, DOCS / "figures" / f"scale-to-speedup-{experiment.name}"):
            print(out)


if __name__ == "__main__":
    main()
