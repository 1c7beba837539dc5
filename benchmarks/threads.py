"""Threads on a small machine: idle, and beside a neighbour that keeps every core busy.

For each workload and thread count, a fresh process runs it and reports its
wall time: the demo (``bbdrop demo --threads N``), and one BB epoch of the CPU
protocol's LeNet-500-300 and LeNet5-Caffe on Fashion-MNIST (pretrained
weights are not needed for timing). Each is timed on the idle machine, then
again while a neighbour process trains LeNet5-Caffe with 2 threads (the
situation of several seeds or experiments at once). A run slower than
``--timeout`` seconds is stopped and reported as ``> timeout``.

    python benchmarks/threads.py            # about 10 minutes on 2 cores

The figures go to docs/benchmarks.md ("Threads"); they set
``bbdrop.threads.SMALL_BATCH_FLOPS``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

EPOCH = """
import sys, time, torch
import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.data import load_dataset
from bbdrop.models import create_model
from bbdrop.train.loop import train_stage

torch.set_num_threads(int(sys.argv[2]))
data = load_dataset("fashion-mnist")
torch.manual_seed(1)
model = bbdrop.attach_gates_(create_model(sys.argv[1]), "bb")
batches = data.train_batches(100, torch.Generator().manual_seed(1))
t0 = time.perf_counter()
train_stage(model, batches, stage="bb", epochs=1, num_train=60000, optim=OptimConfig(),
            evaluate_on=(data.test_x[:100], data.test_y[:100]))
print(time.perf_counter() - t0)
"""

NEIGHBOUR = """
import torch
from bbdrop.data import load_dataset
from bbdrop.models import create_model

torch.set_num_threads(2)
data = load_dataset("fashion-mnist")
model = create_model("lenet5_caffe")
opt = torch.optim.Adam(model.parameters())
while True:
    for x, y in data.train_batches(100, torch.Generator().manual_seed(0)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
"""


def timed(cmd: list[str], timeout: float) -> str:
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f}"
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{err.stderr}") from None
    wall = time.perf_counter() - t0
    inner = done.stdout.strip().splitlines()[-1] if cmd[1] == "-c" else ""
    return f"{float(inner):.1f}" if inner else f"{wall:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=150.0)
    args = parser.parse_args()
    workloads = {
        "demo (whole, s)": lambda n: [sys.executable, "-m", "bbdrop", "demo", "--quiet",
                                      "--threads", str(n)],
        "LeNet-500-300 BB epoch (s)": lambda n: [sys.executable, "-c", EPOCH, "lenet_500_300",
                                                 str(n)],
        "LeNet5-Caffe BB epoch (s)": lambda n: [sys.executable, "-c", EPOCH, "lenet5_caffe",
                                                str(n)],
    }  # fmt: skip
    rows = []
    for name, cmd in workloads.items():
        idle = [timed(cmd(n), args.timeout) for n in (1, 2)]
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
        try:
            time.sleep(5)  # let it load its data and start computing
            loaded = [timed(cmd(n), args.timeout) for n in (1, 2)]
        finally:
            neighbour.kill()
            neighbour.wait()
        rows.append((name, *idle, *loaded))
        print(rows[-1], file=sys.stderr, flush=True)
    print("| workload | idle, 1 thread | idle, 2 threads | neighbour, 1 thread | "
          "neighbour, 2 threads |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
