"""The prepared GPU check (benchmarks/gpu_check.py) in its dry run on the CPU, so that the
script a GPU machine will run has run on every commit. Its ``main`` runs in this process
(its steps are child processes of their own): one start of torch less."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(monkeypatch: pytest.MonkeyPatch) -> Any:
    """benchmarks/gpu_check.py as a module (its ``main`` runs in this process)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclass looks itself up
    spec.loader.exec_module(gpu_check)
    return gpu_check


@pytest.mark.slow
def test_the_gpu_check_runs_its_steps_on_the_cpu_and_prints_one_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu_check = _load(monkeypatch)
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    status = {r[0].lstrip("| "): r[1] for r in rows[1:] if len(r) >= 4 and r[1]}
    assert status == {
        "device tests": "ok",
        "lenet-500-300 eager on cpu": "ok",
        "DDP, nccl, 2 GPUs": "skipped",
    }, out
    assert "s/epoch" in out


def test_the_gpu_check_refuses_an_out_folder_that_holds_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs already there would be resumed, not timed; nothing is written."""
    gpu_check = _load(monkeypatch)
    (tmp_path / "config.toml").write_text("mine")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "config.toml")]) == 2
