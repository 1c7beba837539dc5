"""Gates on a network nobody wrote for bbdrop: what they cost in training, and what the
compacted network gains in wall clock, on a ResNet-18-style CNN.

The network is tests/networks.py's ``ResNet`` (BasicBlocks with batch norm, 1x1
strided shortcuts) at width 64 for 3x32x32 inputs, with one gate per coupled group
of channels (``bbdrop.attach_gates_(net, method, example=x)``: a residual stream
shares one gate, a convolution's channels are gated after its batch norm). One
thread. Two measurements:

1. **Training step.** One step (forward, cross-entropy + ``total_kl / N`` with
   N = 50000, backward, the library's Adam) at batch 32 of the dense network, of
   BB and of DBB (``convert_gates_(net, "dbb", freeze_bb=True)`` after one BB
   forward pass: the paper's second stage). Rounds are interleaved (each round
   times every variant in turn); the figure is the median over rounds of each
   round's median step time as a ratio to the dense step of the same round.
   Target: at most 1.15x.

2. **Compacted network.** A BB-gated network with a chosen fraction of every
   group's units pruned: a seeded ``torch.Generator`` (``--seed``) picks, in each
   group of K units, ``round(fraction * K)`` of them, whose gate parameter ``a``
   is set to 1e-4 (E[pi] = a / (a + 1) with b = 1, below the pruning threshold
   1e-3); the others get ``a`` = 100 (E[pi] = 0.99). The weights are the
   seeded random initialisation; batch norm has its initial statistics.
   ``bbdrop.compact`` removes the pruned units. Printed for it:

   * its FLOPs (FlopCounterMode: matmuls and convolutions) at batch 64, beside the
     FLOPs predicted from the kept units alone: for each Conv2d and Linear of the
     dense network, its FLOPs x (kept input channels / input channels) x (kept
     output channels / output channels), where a layer's kept output channels are
     those its group's gate keeps (all, for a layer that writes no gated group: the
     logits) and its kept input channels those not identically zero at its input
     in the gated network on the batch. The two must agree exactly;
   * the measured speedup at batch 64 (dense network / compacted network, timed
     in interleaved rounds by ``bbdrop.metrics.latencies``) against the FLOP
     speedup. Target: measured >= 0.7 x FLOP speedup;
   * the floor: the same ``ResNet`` written at the kept widths (every group keeps
     the same fraction, so that is ``ResNet(width - round(fraction * width))``),
     never gated, timed in the same rounds: what a network of those widths gains
     on this machine, with nothing of bbdrop in it. "vs plain" is the compacted
     network's time over the plain one's (1.00: compaction costs nothing more).

::

    python benchmarks/any_network.py                         # docs/benchmarks.md
    python benchmarks/any_network.py --fractions 0.5 --rounds 3 --steps 3   # shorter

Run it on an otherwise idle machine (the load averages are printed at the start
and the end).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbdrop
from bbdrop.compaction import without_gates
from bbdrop.config import OptimConfig
from bbdrop.gates.functional import softplus_inverse
from bbdrop.metrics import latencies, measured_flops
from bbdrop.placement import coupled_groups
from bbdrop.threads import machine
from bbdrop.train.denormals import flush_denormals
from bbdrop.train.optimizer import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from networks import ResNet  # tests/networks.py: the test matrix's ResNet

N = 50000  # CIFAR-10's training set: the KL term's divisor
PRUNED_A, KEPT_A = 1e-4, 100.0  # E[pi] = a / (a + 1) with b = 1


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


# -- 1. the training step --------------------------------------------------------------------
def stepper(method: str, width: int, batch: int, seed: int) -> Callable[[], None]:
    torch.manual_seed(seed)
    net = ResNet(width, 10, 3).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if method != "dense":
        bbdrop.attach_gates_(net, "bb", example=x[:8])
        if method == "dbb":
            net(x)  # one BB forward pass, then the second stage's gates
            bbdrop.convert_gates_(net, "dbb", freeze_bb=True)
    opt, _ = build_optimizer(net, OptimConfig(), epochs=1)  # the library's (fused) Adam

    def step() -> None:
        loss = F.cross_entropy(net(x), y) + bbdrop.total_kl(net) / N
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def median_s(step: Callable[[], None], steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def training_steps(width: int, batch: int, rounds: int, steps: int, seed: int) -> None:
    methods = ("dense", "bb", "dbb")
    run = {m: stepper(m, width, batch, seed) for m in methods}
    for step in run.values():  # warm-up
        for _ in range(2):
            step()
    secs: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        got = {m: median_s(run[m], steps) for m in methods}
        for m in methods:
            secs[m].append(got[m])
            ratios[m].append(got[m] / got["dense"])
    print(
        f"\n1. training step: ResNet-18-style, width {width}, batch {batch}, 3x32x32; "
        f"{rounds} interleaved rounds of {steps} steps"
    )
    print(f"{'method':7} {'median ms':>10} {'/ dense':>8} {'rounds (/ dense)':>30}  target <= 1.15")
    for m in methods:
        each = " ".join(f"{r:.3f}" for r in ratios[m])
        ratio = statistics.median(ratios[m])
        verdict = "" if m == "dense" else ("met" if ratio <= 1.15 else "missed")
        print(
            f"{m:7} {1000 * statistics.median(secs[m]):>10.1f} {ratio:>8.3f} {each:>30}  {verdict}"
        )


# -- 2. the compacted network ----------------------------------------------------------------
def pruned_network(width: int, fraction: float, seed: int, example: Tensor) -> nn.Module:
    """A BB-gated ResNet with ``round(fraction * K)`` units of every K-unit group pruned
    through its gate's parameters (module docstring), the units drawn with ``seed``."""
    torch.manual_seed(seed)
    net = ResNet(width, 10, 3)
    bbdrop.attach_gates_(net, "bb", example=example[:8])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in bbdrop.gated_layers(net):
            gate = layer.gate
            k = gate.num_units
            pruned = torch.randperm(k, generator=g)[: round(fraction * k)]
            gate.a_raw.fill_(softplus_inverse(KEPT_A))
            gate.a_raw[pruned] = softplus_inverse(PRUNED_A)
            gate.b_raw.fill_(softplus_inverse(1.0))
    return net.eval()


def predicted_flops(net: nn.Module, x: Tensor) -> tuple[int, int]:
    """(dense FLOPs, FLOPs predicted from the kept units) of ``net``'s Conv2d and Linear
    layers on ``x`` (module docstring).

    A layer's kept output channels are those of the group it writes (its gate's
    ``keep_mask``); its kept input channels are found by running a copy of ``net``
    whose weights are made positive on a positive input: with batch norm at its initial
    statistics every channel is then positive unless a gate zeroed it, so no kept
    channel is zero by chance (as a ReLU may make it with the real weights)."""
    modules = dict(net.named_modules())
    writes: dict[str, Tensor] = {}  # layer -> keep mask of the group it writes
    for plan in coupled_groups(without_gates(net), x[:8]).groups:
        keep = modules[plan.points[0]].gate.keep_mask()
        for name in plan.layers:
            writes[name] = keep
    positive = copy.deepcopy(net).eval()
    with torch.no_grad():
        for m in positive.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_().add_(1e-3)
            if isinstance(m, nn.BatchNorm2d):
                assert bool(
                    (m.running_mean == 0).all() and (m.bias == 0).all() and (m.weight > 0).all()
                ), "batch norm is not at its start"
    counts: list[tuple[int, int]] = []

    def record(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            inp = args[0]
            # FLOPs per (input, output) channel pair, FlopCounterMode's 2 per multiply-add
            if isinstance(m, nn.Conv2d):
                assert m.groups == 1, "ResNet has no grouped convolution"
                cin, cout = m.in_channels, m.out_channels
                n, _, h, w = out.shape
                per_pair = 2 * n * h * w * m.kernel_size[0] * m.kernel_size[1]
                kin = int(inp.gt(0).any(3).any(2).any(0).sum())
            else:
                cin, cout = m.in_features, m.out_features
                per_pair = 2 * out.numel() // cout
                kin = int(inp.gt(0).flatten(0, -2).any(0).sum())
            kout = int(writes[name].sum()) if name in writes else cout
            counts.append((per_pair * cin * cout, per_pair * kin * kout))

        return hook

    handles = [
        m.register_forward_hook(record(name))
        for name, m in positive.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            positive(x.abs())
    finally:
        for h in handles:
            h.remove()
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def compacted(width: int, fractions: list[float], seed: int, rounds: int) -> None:
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    rows = []
    for fraction in fractions:
        net = pruned_network(width, fraction, seed, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an inexact removal would be a CompactWarning
            small = bbdrop.compact(net, x[:8])
        dense = without_gates(net)
        with torch.no_grad():
            diff = float((small(x) - net(x)).abs().max())
        dense_flops, predicted = predicted_flops(net, x)
        measured = measured_flops(small, x)
        assert dense_flops == measured_flops(dense, x), "the dense count is FlopCounterMode's"
        kept = sum(bbdrop.units_kept(net).values())
        total = sum(layer.gate.num_units for _, layer in bbdrop.gated_layers(net))
        plain = ResNet(width - round(fraction * width), 10, 3).eval()  # the floor
        assert sum(p.numel() for p in plain.parameters()) == sum(
            p.numel() for p in small.parameters()
        ), "the plain network has the compacted one's widths"
        t = latencies({"dense": dense, "compacted": small, "plain": plain}, x, rounds=rounds,
                      calls=1)  # fmt: skip
        rows.append(
            (
                fraction,
                kept,
                total,
                dense_flops,
                predicted,
                measured,
                diff,
                t["dense"],
                t["compacted"],
                t["plain"],
            )
        )
    print(
        f"\n2. compacted BB network at batch 64: ResNet-18-style, width {width}, 3x32x32; "
        f"{rounds} interleaved rounds"
    )
    print(
        f"{'pruned':>6} {'units kept':>11} {'dense GFLOP':>11} {'predicted':>14} "
        f"{'FlopCounterMode':>15} {'equal':>5} {'max |diff|':>10} {'dense ms':>8} "
        f"{'compact ms':>10} {'FLOP speedup':>12} {'measured':>8} {'ratio':>5} "
        f"{'target >= 0.7':>13} {'plain ms':>8} {'plain ratio':>11} {'vs plain':>8}"
    )
    for f, kept, total, dense_flops, predicted, measured, diff, td, tc, tp in rows:
        flop_speedup, speedup = dense_flops / measured, td / tc
        ratio = speedup / flop_speedup
        print(
            f"{f:>6.2f} {f'{kept}/{total}':>11} {dense_flops / 1e9:>11.3f} {predicted:>14} "
            f"{measured:>15} {'yes' if predicted == measured else 'NO':>5} {diff:>10.2e} "
            f"{1000 * td:>8.1f} {1000 * tc:>10.1f} {flop_speedup:>11.2f}x {speedup:>7.2f}x "
            f"{ratio:>5.2f} {'met' if ratio >= 0.7 else 'missed':>13} {1000 * tp:>8.1f} "
            f"{td / tp / flop_speedup:>11.2f} {tc / tp:>8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="training-step batch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument(
        "--fractions",
        default="0.25,0.5,0.75",
        help="fractions of every group's units pruned (part 2)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-steps", action="store_true", help="part 2 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flush_denormals()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {machine()}")
    print(f"start: {load()}")
    if not args.skip_steps:
        training_steps(args.width, args.batch, args.rounds, args.steps, args.seed)
    compacted(args.width, [float(f) for f in args.fractions.split(",")], args.seed, args.rounds)
    print(f"\nend: {load()}")


if __name__ == "__main__":
    main()
