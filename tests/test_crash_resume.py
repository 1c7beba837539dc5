"""``kill -9`` at several moments of a run, then the same command again, until it finishes:
the result is the uninterrupted run's, bit for bit (every tensor, the random states, the
history), and no temporary file is left behind.

The runs are real ``bbdrop run`` processes on a tiny Fashion-MNIST in the real file
format, trained on ``data.limit_train`` examples so that the whole test takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import smallfiles
import torch

from bbdrop.train.checkpoint import load_checkpoint

STAGES = ("pretrain", "bb", "dbb", "preprune")
SETTINGS = ["epochs.pretrain=2", "epochs.sparsify=2", "epochs.dbb=2", "device=cpu",
            "optim.batch_size=40", "data.limit_train=200", "data.download=false",
            "data.verify=false"]  # fmt: skip


def _command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bbdrop", "run", "lenet-500-300-fashion-cpu", *SETTINGS,
            f"data.data_dir={data}", "--out", str(out), "--threads", "1", "--quiet"]  # fmt: skip


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BBDROP_DATA"}
    env["XDG_CACHE_HOME"] = str(tmp / "xdg-cache")
    return env


def _kill_when(cmd: list[str], env: dict[str, str], event: Callable[[], bool]) -> bool:
    """Start ``cmd``, SIGKILL it as soon as ``event()`` holds; whether the kill landed at its
    moment: the event had not happened before the start (else the kill hits a process that is
    still starting, not the moment named) and the process was still running (a run that
    finished before the event proves nothing)."""
    early = event()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not event() and time.monotonic() < deadline:
        time.sleep(0.002)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive and not early


@pytest.mark.slow
def test_a_run_killed_again_and_again_resumes_to_the_uninterrupted_result(
    tmp_path: Path,
) -> None:
    smallfiles.write_idx_dataset(tmp_path / "data", "fashion-mnist", 300, 60)
    env = _env(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the uninterrupted run (one thread) goes on beside the killed ones, on the other core
    reference = subprocess.Popen(
        _command(tmp_path / "data", straight), env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        cmd = _command(tmp_path / "data", killed)
        moments = [  # each kill lands just after a file appears, in a process started without it
            lambda: (killed / "config.toml").exists(),  # as it starts: locked, nothing trained
            lambda: (killed / "pretrain.last.pt").exists(),  # pretrain's second epoch
            lambda: (killed / "pretrain.pt").exists(),  # between stages, as BB starts
            lambda: (killed / "bb.last.pt").exists(),  # BB's second epoch
            lambda: (killed / "dbb.last.pt").exists(),  # DBB's second epoch
            lambda: (killed / "dbb.pt").exists(),  # pre-pruning, results.json
        ]
        landed = [_kill_when(cmd, env, moment) for moment in moments]
        assert all(landed), landed  # the six moments of docs/reliability.md, each in a process
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                              check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        _, err = reference.communicate(timeout=300)
        assert reference.returncode == 0, err
    finally:
        reference.kill()
        reference.wait()

    for stage in STAGES:
        a = load_checkpoint(straight / f"{stage}.pt")
        b = load_checkpoint(killed / f"{stage}.pt")
        assert a["model"].keys() == b["model"].keys()
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), (stage, name)
        for key in a["rng"]:
            assert torch.equal(a["rng"][key], b["rng"][key]), (stage, key)
        untimed = lambda r: [h | {"seconds": 0} for h in r["history"]]  # noqa: E731
        assert untimed(a["result"]) == untimed(b["result"]), stage
    results = [json.loads((d / "results.json").read_text()) for d in (straight, killed)]
    for stage in STAGES:
        ra, rb = (r["stages"][stage] for r in results)
        for key in ("error", "units", "active", "speedup", "memory", "at_chance"):
            assert ra[key] == rb[key], (stage, key)
    leftovers = [p.name for p in killed.iterdir() if p.name.endswith(".part")]
    assert not leftovers
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in straight.iterdir())
