"""Training-step time of LeNet-500-300 with BB and DBB gates, relative to no gates.

A step is forward, cross-entropy (+ KL / N for the gated nets), backward and an
Adam step on a batch of 100, on the CPU. The three networks are measured in
one run, interleaved in rounds so that drift of the machine (frequency, other
load) falls on all three alike; the figure is the median step time of each,
and the ratios are medians over rounds of the per-round ratios.

    python benchmarks/step_time.py            # defaults: 15 rounds x 40 steps
    python benchmarks/step_time.py --threads 1

Targets (issue 2): BB at most 1.15x, DBB at most 1.35x.

The last column, "noise floor", is what the random numbers alone cost: the
same torch.rand calls that the gates make for their per-example masks (one
uniform per example and unit for BB, two for DBB), timed in the same rounds,
added to the dense step. No implementation that draws its masks with torch's
CPU generator can go below it.
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
    torch.set_flush_denormal(True)  # as bbdrop's training loop does, for all three nets
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
    widths = (784, 500, 300)

    def noise(draws_per_unit: int):
        def draw() -> None:
            for k in widths:
                torch.rand(k)  # pi (and for DBB, beta: K more numbers)
                for _ in range(draws_per_unit):
                    torch.rand(args.batch, k)

        return draw

    noise_steps = {"bb": noise(1), "dbb": noise(2)}
    for step in (*steps.values(), *noise_steps.values()):  # warm-up
        time_steps(step, 20)

    times: dict[str, list[float]] = {k: [] for k in steps}
    ratios: dict[str, list[float]] = {"bb": [], "dbb": []}
    floors: dict[str, list[float]] = {"bb": [], "dbb": []}
    for _ in range(args.rounds):
        medians = {}
        for name, step in steps.items():
            t = time_steps(step, args.steps)
            times[name] += t
            medians[name] = statistics.median(t)
        for name in ratios:
            ratios[name].append(medians[name] / medians["dense"])
            drawn = statistics.median(time_steps(noise_steps[name], args.steps))
            floors[name].append(1.0 + drawn / medians["dense"])

    print(
        f"LeNet-500-300 training step, batch {args.batch}, CPU "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), {args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"{'net':<6} {'median step (ms)':>17} {'ratio to dense':>15} {'target':>14} "
        f"{'noise floor':>12}"
    )
    targets = {"bb": 1.15, "dbb": 1.35}
    for name in steps:
        ms = 1e3 * statistics.median(times[name])
        if name == "dense":
            print(f"{name:<6} {ms:>17.3f} {'1.000':>15}")
        else:
            r = statistics.median(ratios[name])
            verdict = f"{targets[name]:.2f}x {'met' if r <= targets[name] else 'missed'}"
            floor = statistics.median(floors[name])
            print(f"{name:<6} {ms:>17.3f} {r:>15.3f} {verdict:>14} {floor:>11.3f}x")


if __name__ == "__main__":
    main()
