"""What a training step costs with each method's gates: the registry side by side.

For LeNet-500-300 and LeNet5-Caffe on a batch of 100 random 28x28 inputs
(Fashion-MNIST's shape), the median time of one training step (forward, loss
with the regulariser / N, backward, the library's Adam) of the dense network
and of the network with each method of the registry attached (DBB: converted
from BB, as in the two-stage scheme), and the number of autograd nodes behind
the loss. Rounds are interleaved (each round times every method in turn) and
the figure is the median over rounds of each round's median (after 20
untimed steps), as a ratio to the dense step of the same round::

    python benchmarks/method_step.py                   # both networks, eager
    python benchmarks/method_step.py --model lenet_500_300 --methods sbp,bb
    python benchmarks/method_step.py --compile         # the step through torch.compile

Where a method's gates are many small elementwise operations on vectors of a
few hundred units, the step is bound by the operators' fixed cost rather than
by arithmetic, and ``--compile`` (one fused kernel instead of hundreds of
operators) shows how much of it that is. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from profile_step import autograd_nodes, median_ms
from torch import Tensor, nn

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.threads import machine
from bbdrop.train.denormals import flush_denormals
from bbdrop.train.loop import build_optimizer

N = 60000
METHODS = ("svd", "ssl", "sbp", "l0", "vib", "bb", "dbb")


def network(model_name: str, method: str) -> nn.Module:
    torch.manual_seed(0)
    model = bbdrop.create_model(model_name)
    if method != "dense":
        bbdrop.attach_gates_(model, "bb" if method == "dbb" else method)
        if method == "dbb":
            bbdrop.convert_gates_(model, "dbb")
    return model.train()


def stepper(model_name: str, method: str, compile: bool) -> tuple[Callable[[], None], int]:
    """One training step of ``method`` on ``model_name``, and its autograd node count."""
    model = network(model_name, method)
    opt, _ = build_optimizer(model, OptimConfig(), epochs=1)  # the library's (fused) Adam
    x = torch.rand(100, 1, 28, 28)
    y = torch.randint(0, 10, (100,))

    def objective(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(x), y) + bbdrop.total_kl(model) / N

    nodes = autograd_nodes(objective(x, y))
    run = torch.compile(objective) if compile else objective

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        run(x, y).backward()
        opt.step()

    return step, nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("lenet_500_300", "lenet5_caffe"), action="append")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    methods = ["dense", *args.methods.split(",")]
    torch.set_num_threads(args.threads)
    flush_denormals()
    mode = "compiled" if args.compile else "eager"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {mode}, batch 100")
    print(f"machine: {machine()}")
    for model_name in args.model or ["lenet_500_300", "lenet5_caffe"]:
        steps = {m: stepper(model_name, m, args.compile) for m in methods}
        for step, _ in steps.values():  # warm-up (and compilation)
            for _ in range(5):
                step()
        ratios: dict[str, list[float]] = {m: [] for m in methods}
        ms: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            got = {m: median_ms(steps[m][0], args.steps) for m in methods}
            for m in methods:
                ms[m].append(got[m])
                ratios[m].append(got[m] / got["dense"])
        print(f"\n{model_name}, {args.rounds} rounds of {args.steps} steps")
        print(f"{'method':8} {'autograd nodes':>14} {'median ms':>10} {'/ dense':>8}")
        for m in methods:
            print(f"{m:8} {steps[m][1]:>14} {statistics.median(ms[m]):>10.2f} "
                  f"{statistics.median(ratios[m]):>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
