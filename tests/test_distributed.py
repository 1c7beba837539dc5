"""``train_stage`` on two ranks of a gloo group (the CPU; the environment ``torchrun
--nproc_per_node 2`` gives its workers, in forked processes) against one process: BB, then
DBB from the BB posterior, on LeNet-500-300 (tests/ddp_stages.py, uneven shards: batches
of 45 split 22 + 23, and a last batch of 20), in float64. Then ``torchrun -m bbdrop
reproduce`` itself, in float32.

* The two ranks end bit for bit equal (DDP gives both the same averaged gradients; DBB's
  statistics are all-reduced).
* Against one process: the same units, and every weight, gate parameter and DBB
  statistic within 1e-10 (4.2e-14 measured). The two computations differ only in the
  order of float additions (two shards' gradients summed, against one batch's), so in
  float64 they agree to its rounding, and a slip in the sharding, the KL's scale or the
  all-reduced statistics would show a million times above the tolerance. In float32 the
  same rounding, carried into the weights by Adam's normalised steps, leaves 3.0e-5 on
  fc1.weight after one epoch a stage (4.2e-5 after two; docs/distributed.md): the float32
  path under torchrun is test_bbdrop_reproduce_under_torchrun's, within 1e-4.
* ``bbdrop.sparsify`` with a checkpoint folder: the same units and weights.
* A rank killed mid-run (SIGKILL, in the DBB stage, BB finished) stops the job; the same
  command run again resumes from rank 0's checkpoints, and the comparisons above are made
  on the resumed run (no uninterrupted two-process run: one launch fewer in a suite that
  must stay under 4 minutes; resuming is bit for bit in one process,
  tests/test_crash_resume.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ddp_stages
import pytest
import torch
from forked import forked, needs_fork

SCRIPT = Path(__file__).with_name("ddp_stages.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1] / "src")}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
]


def one_process(out: Path, epochs: int) -> None:
    """tests/ddp_stages.py in this process."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.get_default_dtype()
    try:
        ddp_stages.main(out, epochs, torch.float64)
    finally:
        torch.set_default_dtype(dtype)


def two_ranks(target: Any, *args: Any, logs: Path, die: str = "") -> list[int | None]:
    """``target(*args)`` (of tests/ddp_stages.py) as ranks 0 and 1 of a gloo group,
    forked from this process with the environment torchrun gives its workers (no start of
    torch in each of three processes: seconds each, in a suite that must stay under 4
    minutes; torchrun itself runs in test_bbdrop_reproduce_under_torchrun). As torchrun
    does, a rank that fails stops the other. Returns the exit codes; each rank's stderr
    goes to ``logs``."""
    with socket.socket() as free:  # a free port for the rendezvous
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env: dict[str, str | None] = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "DIE": die,
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    ranks = [forked(target, *args, stderr=logs / f"rank-{r}.err",
                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in (0, 1)]  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while any(r.exitcode is None for r in ranks) and time.monotonic() < deadline:
            if any(r.exitcode not in (None, 0) for r in ranks):
                break
            time.sleep(0.05)
    finally:
        for r in ranks:
            if r.exitcode is None:
                r.kill()
            r.join()
    return [r.exitcode for r in ranks]


def log(logs: Path) -> str:
    return "".join(p.read_text()[-3000:] for p in sorted(logs.glob("*.err")))


def final(out: Path, rank: int) -> dict[str, object]:
    return torch.load(out / f"rank-{rank}.pt", weights_only=True)


@needs_fork
def test_two_processes_train_as_one_and_resume_after_a_rank_is_killed(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(one, 1)
    two.mkdir()
    dead = two_ranks(ddp_stages.main, two, 1, torch.float64, logs=tmp_path,
                     die="1:dbb:1:3")  # rank 1, DBB's third batch
    assert dead[1] == -signal.SIGKILL and dead[0] != 0, (dead, log(tmp_path))
    assert (two / "bb.last.pt").exists() and not (two / "dbb.last.pt").exists()
    assert not (two / "rank-0.pt").exists() and not list(two.glob("*.part*"))
    for err in tmp_path.glob("*.err"):
        err.unlink()
    again = two_ranks(ddp_stages.main, two, 1, torch.float64, logs=tmp_path)
    assert again == [0, 0], (again, log(tmp_path))
    a, b = final(two, 0), final(two, 1)
    for name, tensor in a["state"].items():  # type: ignore[union-attr]
        assert torch.equal(tensor, b["state"][name]), name  # type: ignore[index]
    single = final(one, 0)
    assert single["state"]["fc1.weight"].dtype == torch.float64  # type: ignore[index]
    assert a["units"] == single["units"]
    for name, tensor in single["state"].items():  # type: ignore[union-attr]
        got = a["state"][name]  # type: ignore[index]
        torch.testing.assert_close(got, tensor, rtol=0, atol=1e-10, msg=name)
    assert a["sparsify_units"] == single["sparsify_units"]
    for name, tensor in single["sparsify"].items():  # type: ignore[union-attr]
        torch.testing.assert_close(a["sparsify"][name], tensor, rtol=0, atol=1e-10, msg=name)  # type: ignore[index]

    shutil.rmtree(tmp_path)


@needs_fork
def test_compiled_stages_train_under_ddp(tmp_path: Path) -> None:
    """Pretraining, then DBB, each compiled, on two ranks (tests/ddp_stages.py's
    ``compiled``): both stages train, DBB's parameters move. Without a fresh compile
    cache each stage (bbdrop.distributed.fresh_compile) the DBB stage stops on its
    second step: DDP found DBB's ``scale`` without a gradient (checked: 7 s to fail)."""
    codes = two_ranks(ddp_stages.compiled, tmp_path, logs=tmp_path)
    assert codes == [0, 0], (codes, log(tmp_path))
    saved = torch.load(tmp_path / "compiled.pt", weights_only=True)
    for name in ("fc1.gate.scale", "fc2.gate.shift", "fc3.gate.scale"):
        assert not torch.equal(saved["start"][name], saved["end"][name]), name


def test_bbdrop_reproduce_under_torchrun_writes_once_and_ends_as_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torchrun -m bbdrop reproduce`` (one seed, every stage one epoch, no figures)
    against ``bbdrop reproduce``: one table printed, the same files, the same units and
    errors, final weights within 1e-4 (7.0e-5 at most measured on one seed's run)."""
    import json

    import smallfiles

    from bbdrop.cli import main
    from bbdrop.train.checkpoint import load_checkpoint

    smallfiles.write_idx_dataset(tmp_path / "data", "fashion-mnist", 300, 60)
    args = ["reproduce", "lenet-500-300-fashion-cpu", "--seeds", "1", "epochs.pretrain=1",
            "epochs.sparsify=1", "epochs.dbb=1", "device=cpu", "optim.batch_size=45",
            "data.limit_train=200", "data.download=false", "data.verify=false",
            f"data.data_dir={tmp_path / 'data'}", "--quiet", "--no-figures"]  # fmt: skip
    env = {k: v for k, v in ENV.items() if k != "BBDROP_DATA"}
    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.delenv("BBDROP_DATA", raising=False)
    assert main([*args, "--out", str(one), "threads=1"]) == 0  # one process: this one
    capsys.readouterr()
    done = subprocess.run([*TORCHRUN, "-m", "bbdrop", *args, "--out", str(two)], env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| DBB |") == 1, done.stdout
    files = [sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file()) for d in (one, two)]
    assert files[0] == files[1]
    for seed in (1,):
        a_dir, b_dir = (d / "lenet-500-300-fashion-cpu" / f"seed-{seed}" for d in (one, two))
        r1, r2 = (json.loads((d / "results.json").read_text())["stages"] for d in (a_dir, b_dir))
        for stage in r1:
            assert (r1[stage]["units"], r1[stage]["error"]) == (
                r2[stage]["units"], r2[stage]["error"]
            ), (seed, stage)
            a = load_checkpoint(a_dir / f"{stage}.pt")["model"]
            b = load_checkpoint(b_dir / f"{stage}.pt")["model"]
            for name, tensor in a.items():
                torch.testing.assert_close(b[name], tensor, rtol=0, atol=1e-4,
                                           msg=(seed, stage, name))  # fmt: skip
