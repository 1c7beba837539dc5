"""The budget tables of docs/sparsify.md are the shipped records, unedited: each is
what bbdrop.experiments.budgets.budget_table makes of docs/budgets/<network>/*/budget.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bbdrop.experiments.budgets import budget_table

DOCS = Path(__file__).resolve().parents[1] / "docs"
METHODS = ["svd", "ssl", "sbp", "l0", "vib", "bb", "dbb"]


@pytest.mark.parametrize("network", ["lenet-500-300-fashion-cpu", "lenet5-caffe-fashion-cpu"])
def test_the_docs_budget_table_is_the_records(network: str) -> None:
    records = [json.loads((DOCS / "budgets" / network / m / "budget.json").read_text())
               for m in METHODS]  # fmt: skip
    assert [r["method"] for r in records] == METHODS
    assert all(len(r["points"]) == 3 and r["name"] == network for r in records)
    assert budget_table(records) in (DOCS / "sparsify.md").read_text()
