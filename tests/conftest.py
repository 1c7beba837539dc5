"""Markers that cannot sit on a test's own line.

``make test-fast`` runs ``pytest -m "not slow"``. Most slow tests carry
``@pytest.mark.slow`` themselves, or ``pytest.param(..., marks=pytest.mark.slow)`` per
case. The rows of the bad-input corpus (tests/test_bad_inputs.py) are one parametrized
test built from a list of ``Row`` objects; the few rows that are end-to-end runs are
marked here, by id, so that the corpus itself stays one row per input.
"""

from __future__ import annotations

import warnings

import pytest

BAD_INPUTS = "tests/test_bad_inputs.py::test_bad_input_gets_a_one_line_answer_and_writes_nothing"
SLOW_ROWS = {  # row id: why it is slow
    "reproduce whose worker dies": "reproduce with jobs=2 spawns worker processes",
    "compact: --onnx under /proc": "compacts a trained run and runs torch's ONNX exporter",
    "compact: --onnx onto the trained checkpoint": "compacts a trained run and runs the exporter",
}


@pytest.hookimpl(tryfirst=True)  # before -m and -k deselect
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rows = [item for item in items if item.nodeid.startswith(BAD_INPUTS + "[")]
    for item in rows:
        if item.callspec.id in SLOW_ROWS:  # type: ignore[attr-defined]
            item.add_marker(pytest.mark.slow)
    # A renamed row would silently join the fast loop: say so when the corpus was collected
    # (not when a few rows were asked for by node id).
    if len(rows) > 100:
        gone = set(SLOW_ROWS) - {item.callspec.id for item in rows}  # type: ignore[attr-defined]
        if gone:
            warnings.warn(f"tests/conftest.py SLOW_ROWS names rows that no longer exist: "
                          f"{sorted(gone)}", pytest.PytestWarning, stacklevel=1)  # fmt: skip
