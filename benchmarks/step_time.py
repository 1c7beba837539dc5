"""Training-step time of LeNet-500-300 with BB and DBB gates, relative to no gates.

A step is forward, cross-entropy (+ KL / N for the gated nets), backward and an
Adam step on a batch of 100, on the CPU. All networks are measured in one run,
interleaved in rounds so that drift of the machine (frequency, other load)
falls on all of them alike; the figure is the median step time of each, and
the ratios are medians over rounds of the per-round ratios.

    python benchmarks/step_time.py            # defaults: 15 rounds x 40 steps
    python benchmarks/step_time.py --threads 1

Targets (issue 2): BB at most 1.15x, DBB at most 1.35x.

The gated nets are timed with both implementations of the training masks
(bbdrop.kernels): "compiled", the default where a C++ compiler is available,
and "torch", the eager one. Two reference rows bound what any implementation
can reach on this machine:

- "dense, dL/dx": the dense step when the input also needs its gradient. A
  gate on the network's input (where the paper puts one) needs dL/dx for the
  gradient of its own parameters, and that is a matmul as large as the first
  layer's, which the dense step never computes.
- "dense + torch.rand": the dense step plus the torch.rand calls the eager
  masks make (one uniform per example and unit for BB, two for DBB).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import bbdrop
from bbdrop import kernels

N_TRAIN = 60_000  # KL weight 1/N as for MNIST


def lenet_500_300() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 300), nn.ReLU(), nn.Linear(300, 10)
    )


def make_step(model: nn.Module, gated: bool, x: torch.Tensor, y: torch.Tensor, backend: str):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    model.train()

    def step() -> None:
        kernels.set_backend(backend)
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
    torch.set_flush_denormal(True)  # as bbdrop's training loop does, for all nets
    torch.manual_seed(args.seed)
    backends = ["torch"]
    try:
        kernels.load()
        backends.insert(0, "compiled")
    except RuntimeError as exc:
        print(f"(compiled kernels unavailable: {exc})")

    x = torch.rand(args.batch, 784)
    x_grad = x.clone().requires_grad_(True)
    y = torch.randint(0, 10, (args.batch,))
    steps = {
        "dense": make_step(lenet_500_300(), False, x, y, "torch"),
        "dense, dL/dx": make_step(lenet_500_300(), False, x_grad, y, "torch"),
    }
    for backend in backends:
        bb = bbdrop.attach_gates_(lenet_500_300(), "bb")
        dbb = bbdrop.convert_gates_(
            bbdrop.attach_gates_(lenet_500_300(), "bb"), "dbb", freeze_bb=False
        )
        steps[f"bb {backend}"] = make_step(bb, True, x, y, backend)
        steps[f"dbb {backend}"] = make_step(dbb, True, x, y, backend)
    widths = (784, 500, 300)

    def noise(draws_per_unit: int):
        def draw() -> None:
            for k in widths:
                torch.rand(k)  # pi (and for DBB, beta: K more numbers)
                for _ in range(draws_per_unit):
                    torch.rand(args.batch, k)

        return draw

    extra = {"dense + torch.rand (bb)": noise(1), "dense + torch.rand (dbb)": noise(2)}
    for step in (*steps.values(), *extra.values()):  # warm-up
        time_steps(step, 20)

    times: dict[str, list[float]] = {k: [] for k in steps}
    ratios: dict[str, list[float]] = {k: [] for k in (*steps, *extra)}
    for _ in range(args.rounds):
        medians = {}
        for name, step in steps.items():
            t = time_steps(step, args.steps)
            times[name] += t
            medians[name] = statistics.median(t)
        for name in steps:
            ratios[name].append(medians[name] / medians["dense"])
        for name, draw in extra.items():
            drawn = statistics.median(time_steps(draw, args.steps))
            ratios[name].append(1.0 + drawn / medians["dense"])

    print(
        f"LeNet-500-300 training step, batch {args.batch}, CPU "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'net':<25} {'median step (ms)':>17} {'ratio to dense':>15} {'target':>14}")
    targets = {"bb": 1.15, "dbb": 1.35}
    for name in (*steps, *extra):
        r = statistics.median(ratios[name])
        ms = f"{1e3 * statistics.median(times[name]):.3f}" if name in times else ""
        kind = name.split()[0]
        verdict = ""
        if kind in targets:
            verdict = f"{targets[kind]:.2f}x {'met' if r <= targets[kind] else 'missed'}"
        print(f"{name:<25} {ms:>17} {r:>15.3f} {verdict:>14}")


if __name__ == "__main__":
    main()
