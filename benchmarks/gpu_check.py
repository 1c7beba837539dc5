"""The prepared GPU check: everything bbdrop should do on a CUDA device, in one command
that prints one summary table (about 5 minutes on one GPU, no network access).

    python benchmarks/gpu_check.py              # on the GPU machine, from the repository
    python benchmarks/gpu_check.py --dry-run    # the same steps on the CPU, small (CI)

Steps, each in its own process with a time limit, so that one failure does not hide
the others:

1. the test suite's ``device``-marked tests (tests/test_device.py and others) on CUDA:
   every method against the CPU, a training step in float32 and bf16, a stage that
   resumes, compaction, ONNX from the device;
2. ``bbdrop demo`` on CUDA;
3. one epoch per stage (pretraining, BB, DBB) of LeNet-500-300 and LeNet5, eager and
   with ``--compile``, on CUDA and on the CPU: seconds per epoch side by side. The data
   are random images in Fashion-MNIST's file format, made here (no download): the speed
   of an epoch does not depend on the pixels;
4. ``torchrun --nproc_per_node 2 -m bbdrop run`` (DDP on nccl, one epoch per stage)
   when 2 or more GPUs are present.

The table's ``seconds`` are each step's wall clock; ``detail`` holds the per-epoch times
or the failure's last line. Paste the table into docs/benchmarks.md with the GPU's name.
Installs nothing: it runs with the torch, numpy and pytest it finds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ("lenet-500-300-fashion-cpu", "lenet5-caffe-fashion-cpu")
STAGES = ("pretrain", "bb", "dbb")


@dataclass
class Row:
    step: str
    status: str  # ok, FAILED, timed out, skipped
    seconds: float
    detail: str


def run(step: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Row:
    """``argv`` in a child process: ok when it exits 0 within ``timeout`` seconds."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout,
                              capture_output=True, text=True)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Row(step, "timed out", time.perf_counter() - t0, f"limit {timeout:.0f} s")
    seconds = time.perf_counter() - t0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode != 0:
        return Row(step, "FAILED", seconds, lines[-1][:160] if lines else f"exit {done.returncode}")
    return Row(step, "ok", seconds, lines[-1][:160] if lines else "")


def fake_fashion_mnist(root: Path, n_train: int, n_test: int) -> Path:
    """Random images and labels in Fashion-MNIST's four gzipped IDX files."""
    rng = np.random.default_rng(0)
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        sizes = b"".join(struct.pack(">I", s) for s in array.shape)
        header = bytes([0, 0, 0x08, array.ndim]) + sizes  # IDX: unsigned bytes, big-endian sizes
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + array.tobytes(), 1, mtime=0))
    return root


def epoch_row(network: str, device: str, compiled: bool, data: Path, out: Path,
              limit: int, timeout: float) -> Row:  # fmt: skip
    """One epoch of each stage of ``network`` on ``device``: seconds per epoch."""
    name = f"{network.split('-fashion')[0]} {'compiled' if compiled else 'eager'} on {device}"
    folder = out / name.replace(" ", "_")
    argv = [sys.executable, "-m", "bbdrop", "run", network, "--out", str(folder), "--quiet",
            "--device", device, "epochs.pretrain=1", "epochs.sparsify=1", "epochs.dbb=1",
            f"data.data_dir={data}", "data.download=false", "data.verify=false",
            f"data.limit_train={limit}", *(["--compile"] if compiled else [])]  # fmt: skip
    row = run(name, argv, timeout)
    if row.status == "ok":
        stages = json.loads((folder / "results.json").read_text())["stages"]
        row.detail = ", ".join(
            f"{s} {stages[s]['seconds_per_epoch']:.2f} s/epoch" for s in STAGES if s in stages
        )
    return row


def ddp_row(dry: bool, data: Path, out: Path, limit: int, timeout: float) -> Row:
    """``torchrun --nproc_per_node 2 -m bbdrop run`` of LeNet-500-300 on two GPUs (nccl),
    one epoch per stage; skipped with fewer than 2 GPUs (and in the dry run: CI tests
    torchrun on gloo, tests/test_distributed.py)."""
    if dry or torch.cuda.device_count() < 2:
        why = "dry run" if dry else f"{torch.cuda.device_count()} GPU(s); needs 2"
        return Row("DDP, nccl, 2 GPUs", "skipped", 0.0, why)
    folder = out / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "bbdrop", "run", NETWORKS[0], "--out", str(folder), "--quiet",
            "--device", "cuda", "epochs.pretrain=1", "epochs.sparsify=1", "epochs.dbb=1",
            f"data.data_dir={data}", "data.download=false", "data.verify=false",
            f"data.limit_train={limit}"]  # fmt: skip
    row = run("DDP, nccl, 2 GPUs", argv, timeout)
    if row.status == "ok":
        stages = json.loads((folder / "results.json").read_text())["stages"]
        row.detail = ", ".join(
            f"{s} {stages[s]['seconds_per_epoch']:.2f} s/epoch" for s in STAGES if s in stages
        )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the same steps on the CPU, small data (what CI runs)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="a new or empty folder for the runs (default: temporary)")  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out
    if out is not None and (out.is_file() or (out.is_dir() and any(out.iterdir()))):
        # runs already there would be resumed, not timed, and their files are not ours
        print(f"gpu_check: --out {args.out} is not an empty folder; give a new one",
              file=sys.stderr)  # fmt: skip
        return 2
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; run it on a GPU machine, or --dry-run "
              "for the CPU", file=sys.stderr)  # fmt: skip
        return 2
    device = "cpu" if dry else "cuda"
    limit, n_test, timeout = (200, 100, 120) if dry else (10000, 10000, 240)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        data = fake_fashion_mnist(Path(tmp) / "data", limit, n_test)
        # dry: the selection is collected, not run (the test suite runs these tests anyway)
        collect = ["--collect-only"] if dry else []
        rows.append(run("device tests", [sys.executable, "-m", "pytest", "-q", "-m", "device",
                                         "-p", "no:cacheprovider", *collect,
                                         "tests/test_device.py" if dry else "tests"],
                        timeout, {"BBDROP_TEST_DEVICE": device}))  # fmt: skip
        if not dry:  # the demo on the CPU is the README's main job, tested on every run
            demo = [sys.executable, "-m", "bbdrop", "demo", "--device", device, "--quiet"]
            rows.append(run(f"demo on {device}", demo, timeout))
        for network in NETWORKS[:1] if dry else NETWORKS:
            for compiled in ([False] if dry else [False, True]):  # dry: no C++ build in CI
                for where in dict.fromkeys([device, "cpu"]):
                    rows.append(epoch_row(network, where, compiled, data, out, limit, timeout))
        rows.append(ddp_row(dry, data, out, limit, timeout))
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name(0)
    print(f"\nbbdrop GPU check on {name}, torch {torch.__version__}\n")
    print("| step | status | seconds | detail |\n|---|---|---:|---|")
    if dry:
        print("| (dry run: the device tests collected, not run; no demo; one network, eager) "
              "| | | |")
    for r in rows:
        print(f"| {r.step} | {r.status} | {r.seconds:.1f} | {r.detail} |")
    return 0 if all(r.status in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
