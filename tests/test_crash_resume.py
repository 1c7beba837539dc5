"""``kill -9`` at several moments of a run, then the same command again, until it finishes:
the result is the uninterrupted run's, bit for bit (every tensor, the random states, the
history), and no temporary file is left behind.

The runs are ``bbdrop run`` processes (``bbdrop.cli.main``, forked from the test: see
tests/forked.py) on a tiny Fashion-MNIST in the real file format, trained on
``data.limit_train`` examples so that the whole test takes seconds.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import smallfiles
import torch
from forked import forked, needs_fork

from bbdrop.cli import main
from bbdrop.train.checkpoint import load_checkpoint

STAGES = ("pretrain", "bb", "dbb", "preprune")
SETTINGS = ["epochs.pretrain=2", "epochs.sparsify=2", "epochs.dbb=2", "device=cpu",
            "optim.batch_size=40", "data.limit_train=200", "data.download=false",
            "data.verify=false"]  # fmt: skip


def _argv(data: Path, out: Path) -> list[str]:
    return ["run", "lenet-500-300-fashion-cpu", *SETTINGS, f"data.data_dir={data}", "--out",
            str(out), "--threads", "1", "--quiet"]  # fmt: skip


def _run(argv: list[str], tmp: Path) -> multiprocessing.Process:
    """``bbdrop run`` started in a forked process, on its own cache, without $BBDROP_DATA;
    its stderr goes to ``tmp / "stderr"``."""
    env = {"BBDROP_DATA": None, "XDG_CACHE_HOME": str(tmp / "xdg-cache")}
    return forked(main, argv, env=env, stderr=tmp / "stderr")


def _kill_when(argv: list[str], tmp: Path, event: Callable[[], bool]) -> bool:
    """Start ``argv``, SIGKILL it as soon as ``event()`` holds; whether the kill landed at its
    moment: the event had not happened before the start (else the kill hits a process that is
    still starting, not the moment named) and the process was still running (a run that
    finished before the event proves nothing)."""
    early = event()
    proc = _run(argv, tmp)
    deadline = time.monotonic() + 120
    while proc.exitcode is None and not event() and time.monotonic() < deadline:
        time.sleep(0.002)
    alive = proc.exitcode is None
    if alive:
        proc.kill()
    proc.join()
    return alive and not early


@pytest.mark.slow
@needs_fork
def test_a_run_killed_again_and_again_resumes_to_the_uninterrupted_result(
    tmp_path: Path,
) -> None:
    smallfiles.write_idx_dataset(tmp_path / "data", "fashion-mnist", 300, 60)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the uninterrupted run goes on beside the killed ones
    reference = _run(_argv(tmp_path / "data", straight), tmp_path)
    try:
        argv = _argv(tmp_path / "data", killed)
        moments = [  # each kill lands just after a file appears, in a process started without it
            lambda: (killed / "config.toml").exists(),  # as it starts: locked, nothing trained
            lambda: (killed / "pretrain.last.pt").exists(),  # pretrain's second epoch
            lambda: (killed / "pretrain.pt").exists(),  # between stages, as BB starts
            lambda: (killed / "bb.last.pt").exists(),  # BB's second epoch
            lambda: (killed / "dbb.last.pt").exists(),  # DBB's second epoch
            lambda: (killed / "dbb.pt").exists(),  # pre-pruning, results.json
        ]
        landed = [_kill_when(argv, tmp_path, moment) for moment in moments]
        assert all(landed), landed  # the six moments of docs/reliability.md, each in a process
        done = _run(argv, tmp_path)
        done.join(300)
        reference.join(300)
        err = (tmp_path / "stderr").read_text()
        assert (done.exitcode, reference.exitcode) == (0, 0), err
    finally:
        reference.kill()
        reference.join()

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
