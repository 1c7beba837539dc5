"""Markers that cannot sit on a test's own line, and the cores of parallel workers.

``make test-fast`` runs ``pytest -m "not slow"``. Most slow tests carry
``@pytest.mark.slow`` themselves, or ``pytest.param(..., marks=pytest.mark.slow)`` per
case. The rows of the bad-input corpus (tests/test_bad_inputs.py) are one parametrized
test built from a list of ``Row`` objects; the few rows that are end-to-end runs are
marked here, by id, so that the corpus itself stays one row per input.

``make test`` runs the tests in two processes (``pytest -n 2``, pytest-xdist), each on its
own share of the cores (:func:`pytest_configure`); a test about the machine's cores asks
for the :func:`all_cores` fixture.
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Iterator

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
    _heaviest_files_first(items)


# Seconds each of the longest files takes in ``make test`` (2 cores, 2026-12-07): only the
# order in which the two workers take the files depends on them, so a stale figure costs
# balance, never a result.
SECONDS = {"test_workers.py": 40, "test_distributed.py": 40, "test_configs_smoke.py": 28,
           "test_cli.py": 30, "test_any_network.py": 25, "test_cli_pipeline.py": 27,
           "test_pipeline.py": 26, "test_budget.py": 23, "test_bad_inputs.py": 22,
           "test_precision.py": 20, "test_compact.py": 17, "test_factories.py": 15,
           "test_gpu_check.py": 10}  # fmt: skip


def _heaviest_files_first(items: list[pytest.Item]) -> None:
    """Order the test files longest first (:data:`SECONDS`, then by how many end-to-end
    (slow) tests a file holds), keeping the order within a file: two workers (``-n 2
    --dist loadscope --no-loadscope-reorder``, the Makefile) then take the long files early
    and finish together, rather than one of them meeting a long file last, while the
    other has finished. (pytest-xdist's own reordering, by the number of tests in a file,
    sent the four longest files to one worker: 32 s apart at the end.)"""
    slow = collections.Counter(
        item.path for item in items if item.get_closest_marker("slow") is not None
    )
    items.sort(key=lambda item: (-SECONDS.get(item.path.name, 0), -slow[item.path]))


# Under ``pytest -n N`` (pytest-xdist: make test), each worker computes on its own share of
# the cores: (all cores, its share), set by pytest_configure; None in a plain pytest run.
_CORES: tuple[set[int], set[int]] | None = None


def _pin(cores: set[int]) -> None:
    """Every thread of this process (torch's pool too, if started) on ``cores``, and torch
    computing with one thread per core; the processes a test starts inherit the cores."""
    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), cores)
    import torch

    torch.set_num_threads(len(cores))


def pytest_configure(config: pytest.Config) -> None:
    """Worker i of N takes every Nth core: two workers on two cores get one each, rather
    than four threads waiting at torch's barriers for the core the other worker holds
    (bbdrop.threads), which made the suite no faster than one process."""
    global _CORES
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if not 1 < count <= len(cores):
        return
    share = set(cores[int(worker[2:]) % count :: count])
    _CORES = (set(cores), share)
    _pin(share)


@pytest.fixture
def all_cores() -> Iterator[int]:
    """For a test about the machine's cores: every core this pytest may use (a worker's
    share undone for the test), and how many."""
    if _CORES is None:
        yield len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return
    every, share = _CORES
    _pin(every)
    try:
        yield len(every)
    finally:
        _pin(share)
