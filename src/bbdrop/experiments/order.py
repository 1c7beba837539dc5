"""The paper's order of methods and stages, shared by the runner, the tables and the
figures, and one seed's runs of several methods combined in that order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bbdrop import records

# The paper's row order; a run's stages are listed in this order in the table.
METHOD_ORDER = ("svd", "ssl", "sbp", "l0", "vib", "bb", "dbb")


def _rank(stage: str) -> int:
    """A stage's place in the paper's order (methods it does not have: before BB)."""
    order = ("pretrain", *METHOD_ORDER[:-2], "", *METHOD_ORDER[-2:], "preprune")
    return order.index(stage if stage in order else "")


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
