"""The sweep records behind docs/baselines.md (docs/sweeps/<experiment>/<method>/sweep.json)
agree with the selection rule and with the configurations shipped from them."""

import json
from pathlib import Path

import pytest

from bbdrop.experiments import experiment_config, list_experiments, select_scale

RECORDS = sorted((Path(__file__).parents[1] / "docs" / "sweeps").glob("*/*/sweep.json"))


def test_there_are_records() -> None:
    assert RECORDS


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_a_record_chose_by_the_rule_and_its_choice_is_shipped(path: Path) -> None:
    record = json.loads(path.read_text())
    assert record["method"] == path.parent.name and record["name"] == path.parent.parent.name
    assert record["validation"] == 10000
    assert len({p["scale"] for p in record["points"]}) >= 5  # at least five scales
    assert select_scale(record["points"]) == record["chosen_scale"]
    weight = {p["kl_scale"] for p in record["points"] if p["scale"] == record["chosen_scale"]}
    assert len(weight) == 1
    method = record["method"]
    shipped = f"{record['name']}-{method}"
    if method in ("bb", "dbb"):  # BB and DBB are the experiment's own configuration
        shipped = record["name"]
    assert shipped in list_experiments(), f"the chosen setting of {path} is not shipped"
    cfg = experiment_config(shipped)
    gate = cfg.gate
    assert (gate.dbb_kl_scale if method == "dbb" else gate.kl_scale) == pytest.approx(weight.pop())
    assert cfg.data.validation == 0  # the shipped configuration trains on every example
