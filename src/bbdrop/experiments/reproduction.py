"""``reproduce``: an experiment run over seeds (and over methods, from one pretrained
network), then its table, summary and figures written in its folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bbdrop.config import apply_overrides
from bbdrop.data import Dataset
from bbdrop.distributed import init_from_env
from bbdrop.files import json_bytes, write_together
from bbdrop.pipeline import load_data
from bbdrop.stages import resolve_device
from bbdrop.train.loop import Progress

from .borrowing import _borrow_stages
from .catalogue import experiment_config
from .figures import FIGURE_NAMES, write_figures
from .order import _combine
from .runner import _check_outputs_of, _check_seeds_and_jobs, _method_plans, _run_plans
from .tables import markdown_table, summarize


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
    init_from_env(resolve_device(base.device))  # under torchrun (docs/distributed.md)
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
    write_together({out / "table.md": table.encode("utf-8"),
                    out / "summary.json": json_bytes(summarize(combined))})  # fmt: skip
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
