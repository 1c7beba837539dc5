"""The prepared GPU check (benchmarks/gpu_check.py) in its dry run on the CPU, so that the
script a GPU machine will run has run on every commit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_its_steps_on_the_cpu_and_prints_one_table(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ")]
    status = {r[0].lstrip("| "): r[1] for r in rows[1:] if len(r) >= 4 and r[1]}
    assert status == {
        "device tests": "ok",
        "lenet-500-300 eager on cpu": "ok",
        "DDP, nccl, 2 GPUs": "skipped",
    }, done.stdout
    assert "s/epoch" in done.stdout
