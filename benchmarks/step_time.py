"""Training-step time of LeNet-500-300 with BB and DBB gates, relative to no gates.

A step is forward, cross-entropy (+ KL / N for the gated nets), backward and an
Adam step on a batch of 100, on the CPU. The three networks are measured in
one run, interleaved in rounds so that drift of the machine (frequency, other
load) falls on all three alike; the figure is the median step time of each,
and the ratios are medians over rounds of the per-round ratios.

    python benchmarks/step_time.py            # defaults: 15 rounds x 40 steps
    python benchmarks/step_time.py --threads 1

Targets (issue 2): BB at most 1.15x, DBB at most 1.35x.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import bbdrop

N_TRAIN = 60_000  # KL weight 1/N as for MNIST


def lenet_500_300() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 300), nn.ReLU(), nn.Linear(300, 10)
    )


def make_step(model: nn.Module, gated: bool, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if gated:
            loss = loss + bbdrop.total_kl(model) / N_TRAIN
        loss.backward()
        opt.step()

    return step


def time_steps(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40, help="steps per network per round")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x = torch.rand(args.batch, 784)
    y = torch.randint(0, 10, (args.batch,))
    dense = lenet_500_300()
    bb = bbdrop.attach_gates_(lenet_500_300(), "bb")
    dbb = bbdrop.convert_gates_(bbdrop.attach_gates_(lenet_500_300(), "bb"), "dbb", freeze_bb=False)
    steps = {
        "dense": make_step(dense, False, x, y),
        "bb": make_step(bb, True, x, y),
        "dbb": make_step(dbb, True, x, y),
    }
    for step in steps.values():  # warm-up: allocator, kernels, Adam state
        time_steps(step, 20)

    times: dict[str, list[float]] = {k: [] for k in steps}
    ratios: dict[str, list[float]] = {"bb": [], "dbb": []}
    for _ in range(args.rounds):
        medians = {}
        for name, step in steps.items():
            t = time_steps(step, args.steps)
            times[name] += t
            medians[name] = statistics.median(t)
        for name in ratios:
            ratios[name].append(medians[name] / medians["dense"])

    print(
        f"LeNet-500-300 training step, batch {args.batch}, CPU "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'net':<6} {'median step (ms)':>17} {'ratio to dense':>15} {'target':>7}")
    targets = {"bb": 1.15, "dbb": 1.35}
    for name in steps:
        ms = 1e3 * statistics.median(times[name])
        if name == "dense":
            print(f"{name:<6} {ms:>17.3f} {'1.000':>15} {'':>7}")
        else:
            r = statistics.median(ratios[name])
            ok = "ok" if r <= targets[name] else "MISSED"
            print(f"{name:<6} {ms:>17.3f} {r:>15.3f} {targets[name]:>6.2f}x {ok}")


if __name__ == "__main__":
    main()
