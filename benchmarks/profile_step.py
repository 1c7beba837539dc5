"""Where a training step's time goes: autograd nodes, per-gate overhead, the top operators.

For LeNet-500-300 on a batch of 100 random 28x28 inputs (Fashion-MNIST's shape):

1. autograd nodes recorded per training step (the graph behind the loss);
2. median step time (forward, loss with KL / N, backward, Adam) of: the dense
   network, the dense network with the input's gradient on (the floor of the
   paper's gate on the network input, which needs that gradient), bbdrop's BB
   and DBB, the authors' way of computing them (benchmarks/reference_gates.py),
   BB with the relaxed-Bernoulli multiply as one custom autograd Function
   that saves the mask (an experiment defined here, to measure what such a
   Function would save; the library does not ship it), and the dense, BB and
   DBB steps with the objective through ``torch.compile``, with the number of
   graphs and graph breaks ``torch._dynamo.explain`` finds in it;
3. the fixed cost of one gate's forward pass on two examples (Python and
   dispatch overhead, where the arithmetic is negligible);
4. the ten operators with the most self CPU time in a BB and a DBB step.

    python benchmarks/profile_step.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
from reference_gates import register
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.gates import functional as BF
from bbdrop.gates.bb import BetaBernoulliGate
from bbdrop.threads import machine
from bbdrop.train.denormals import flush_denormals
from bbdrop.train.loop import build_optimizer

N = 60000


class _FusedMul(torch.autograd.Function):
    """x * z with z ~ RelaxedBernoulli(tau, logits) per (example, unit), saving z."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, logits: Tensor, tau: float) -> Tensor:
        z = BF.logistic_noise(x.shape, x).add_(logits).mul_(1.0 / tau).sigmoid_()
        ctx.tau = tau
        ctx.save_for_backward(x, z)
        return x * z

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, z = ctx.saved_tensors
        g = grad * x * z * (1 - z) / ctx.tau
        return grad * z, g.sum(0), None


class FusedBB(BetaBernoulliGate):
    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        return _FusedMul.apply(x, self.sample_logit_pi(), self.temperature)


def network(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = bbdrop.create_model("lenet_500_300")
    if kind in ("bb", "dbb"):
        bbdrop.attach_gates_(model, "bb")
        if kind == "dbb":
            bbdrop.convert_gates_(model, "dbb")
    elif kind.startswith("ref-"):
        bbdrop.attach_gates_(model, kind)
    elif kind == "bb, fused multiply":
        if "fused-bb" not in bbdrop.list_gates():
            bbdrop.register_gate("fused-bb")(FusedBB)
        bbdrop.attach_gates_(model, "fused-bb")
    return model.train()


def stepper(kind: str) -> tuple[Callable[[], Tensor], Callable[[], None]]:
    compiled = kind.endswith(", compiled")
    model = network(kind.removesuffix(", compiled"))
    opt, _ = build_optimizer(model, OptimConfig(), epochs=1)  # the library's (fused) Adam
    x = torch.rand(100, 1, 28, 28, requires_grad=kind == "dense, dL/dx")
    y = torch.randint(0, 10, (100,))

    def objective(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(x), y) + bbdrop.total_kl(model) / N

    if compiled:
        explained = torch._dynamo.explain(objective)(x, y)
        print(f"  {kind}: {explained.graph_count} graph(s), "
              f"{explained.graph_break_count} graph break(s)")  # fmt: skip
        objective = torch.compile(objective)

    def loss() -> Tensor:
        return objective(x, y)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return loss, step


def autograd_nodes(loss: Tensor) -> int:
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return len(seen)


def median_ms(step: Callable[[], None], repeats: int = 200) -> float:
    for _ in range(20):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    register()
    flush_denormals()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LeNet-500-300, batch 100")
    kinds = ["dense", "dense, dL/dx", "bb", "ref-bb", "bb, fused multiply", "dbb", "ref-dbb",
             "dense, compiled", "bb, compiled", "dbb, compiled"]  # fmt: skip
    print(f"machine: {machine()}")
    steps = {k: stepper(k) for k in kinds}
    print(f"\n{'step':<20} {'autograd nodes':>14} {'median ms':>10} {'/ dense':>8}")
    dense = None
    for kind, (loss, step) in steps.items():
        nodes = autograd_nodes(loss())
        ms = median_ms(step)
        dense = dense or ms
        print(f"{kind:<20} {nodes:>14} {ms:>10.3f} {ms / dense:>8.2f}")

    print("\none gate's training forward pass on two examples (its fixed cost per step), us:")
    for name in ("bb", "dbb", "ref-bb", "ref-dbb"):
        gate = bbdrop.create_gate(name, 500).train()
        x = torch.rand(2, 500)  # two: the reference's batch norm needs more than one
        for _ in range(100):
            gate(x)
        t0 = time.perf_counter()
        for _ in range(2000):
            gate(x)
        print(f"  {name:<8} {1e6 * (time.perf_counter() - t0) / 2000:8.1f}")

    for kind in ("bb", "dbb"):
        _, step = steps[kind]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                step()
        print(f"\n{kind}: top operators by self CPU time over 20 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
