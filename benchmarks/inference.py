"""Wall clock of the pruned networks beside their FLOP speedups: dense vs compacted (every
method) vs run-time DBB, from trained checkpoints.

For each experiment under RUNS (the layout ``bbdrop reproduce --methods ... --out RUNS``
writes: RUNS/<experiment>/<method>/seed-N/), the dense network (the pretrained
stage), each method's network compacted with ``bbdrop.compact`` (BB; DBB after
pre-pruning, with its masks; SVD, SSL, SBP, L0, VIB), and DBB with run-time pruning
(``bbdrop.runtime_pruned``) are timed on Fashion-MNIST test images:

* batch 256: the first 256 test images;
* batch 1: 64 test images one at a time (DBB switches other units on for each).

Every (batch, threads) setting times all networks in interleaved rounds
(``bbdrop.metrics.latencies``), so each speedup is a ratio within one measurement.
Beside them: the paper-accounting FLOP speedup from the stage's results.json and
the ``FlopCounterMode`` one (matmul and convolution FLOPs of the compacted network;
for run-time DBB, averaged over the batch-1 images). "DBB floor" times, at batch 1,
everything a run-time DBB network must do in eager PyTorch but its products (masks
in their fewest operations, finding and taking the units each example switched on,
ReLU, pooling): the floor under run-time DBB at batch 1 (:class:`Floor`). At batch
256, "products alone" times only each network's Linear and Conv2d layers on their
inputs (:class:`Products`), and goal 1 is checked for both. ``--round-to 1,8,16``
adds every method compacted with ``round_to=8`` and ``16``. Before timing, each
compacted network's output is checked against its gated network on the test images::

    python benchmarks/inference.py /work/runs                          # all found
    python benchmarks/inference.py runs --experiments lenet-500-300-fashion-cpu \\
        --threads 1 --batches 1
    python benchmarks/inference.py runs --rounds 9 --round-to 1,8,16   # docs/benchmarks.md

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbdrop
from bbdrop.compaction import (
    CompactWarning,
    DependentMask,
    attach_beside_,
    beside,
    detach_beside_,
    set_submodule,
    without_gates,
)
from bbdrop.experiments import METHOD_ORDER, load_stage
from bbdrop.metrics import latencies, measured_flops
from bbdrop.threads import machine
from bbdrop.train.denormals import flush_denormals

EXPERIMENTS = ("lenet-500-300-fashion-cpu", "lenet5-caffe-fashion-cpu")
SINGLES = 64  # test images timed one at a time


def flops(model: nn.Module, xs: list[Tensor]) -> float:
    """Matmul and convolution FLOPs per example (``measured_flops``), averaged over ``xs``."""
    return sum(measured_flops(model, x) for x in xs) / sum(len(x) for x in xs)


class _LeanMask(nn.Module):
    """DBB's mask in the fewest eager operations (equal to DependentMask's up to
    rounding): ``pi`` folded into the affine map and the clamp's bounds, the
    threshold as one ``F.threshold``. It keeps its mask in ``state`` for the layer."""

    def __init__(self, m: DependentMask, state: dict) -> None:
        super().__init__()
        self.a, self.b = m.pi * m.mul, m.pi * (m.shift - m.mean * m.mul)
        self.lo, self.hi, self.t = m.pi * m.eps, m.pi * (1.0 - m.eps), m.threshold
        self.state = state

    def forward(self, x: Tensor) -> Tensor:
        h = x.mean(dim=(2, 3)) if x.dim() == 4 else x
        z = F.threshold(torch.addcmul(self.b, h, self.a).clamp_(self.lo, self.hi), self.t, 0.0)
        self.state["z"] = z
        return x * (z[..., None, None] if x.dim() == 4 else z)


class _FreeProduct(nn.Module):
    """A layer whose product costs nothing: its output for each example is looked up
    (recorded from the real layer). After a mask it still finds the units switched on
    and takes their values, which any layer that skips the others must do."""

    def __init__(self, outputs: dict[int, Tensor], state: dict, skips: bool) -> None:
        super().__init__()
        self.outputs, self.state, self.skips = outputs, state, skips

    def forward(self, x: Tensor) -> Tensor:
        if self.skips:
            x.index_select(1, self.state["z"][0].nonzero().flatten())
        return self.outputs[self.state["key"]]


class Floor(nn.Module):
    """The floor of run-time DBB at batch 1: what the compacted DBB network ``net``
    must still do in eager PyTorch if every product cost nothing. The same modules
    with each mask in its fewest operations (:class:`_LeanMask`) and each
    convolution or dense layer replaced by a lookup of its output; a layer after a
    mask still finds and takes the units its example switched on. Works on the
    examples of ``inputs`` only (their outputs are recorded)."""

    def __init__(self, net: nn.Module, inputs: list[Tensor]) -> None:
        super().__init__()
        self.inputs, self.state = inputs, {}
        self.net = copy.deepcopy(net).eval()
        # the modules that run as one step: leaves, and layers with a gather or mask beside
        steps = {n: m for n, m in self.net.named_modules()
                 if {c for c, _ in m.named_children()} <= set(beside(m).children())}  # fmt: skip
        outputs: dict[str, dict[int, Tensor]] = {
            n: {} for n, m in steps.items() if isinstance(m, (nn.Linear, nn.Conv2d))}  # fmt: skip
        order: list[str] = []  # the steps in the order they run

        def record(n: str):  # a layer's own output: before a mask on it (prepend)
            def hook(m: nn.Module, args: tuple, out: Tensor) -> None:
                if n not in order:
                    order.append(n)
                if n in outputs:
                    outputs[n][self.state["key"]] = out

            return hook

        hooks = [m.register_forward_hook(record(n), prepend=True) for n, m in steps.items()]
        seen = {n: [] for n, m in steps.items() if isinstance(m, DependentMask)}
        hooks += [steps[n].register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0]))
                  for n in seen]  # fmt: skip
        with torch.no_grad():
            for x in inputs:
                self.state["key"] = id(x)
                self.net(x)
        for h in hooks:
            h.remove()
        units = None  # the units of the last mask, which the next product reads
        free = []
        for name in order:
            module = steps[name]
            if isinstance(module, DependentMask):
                units = module.pi.numel()
            elif name in outputs:
                inputs_of = (
                    module.in_features if isinstance(module, nn.Linear) else module.in_channels
                )
                if units is not None and units != inputs_of:
                    raise SystemExit(f"Floor: {name} does not read the units of the mask before it")
                free.append((name, units is not None))
                units = None
        for name, skips in free:  # its gather and masks run around it, as around the layer
            product = _FreeProduct(outputs[name], self.state, skips)
            attach_beside_(product, detach_beside_(steps[name]))
            set_submodule(self.net, name, product)
        for name in seen:
            module = steps[name]
            lean = _LeanMask(module, self.state)
            with torch.no_grad():  # the same mask up to rounding, on these inputs
                gap = max(float((lean(h) - module(h)).abs().max()) for h in seen[name])
            print(f"  DBB floor: {name}'s mask in its fewest operations, largest "
                  f"difference to the network's {gap:.1e}")  # fmt: skip
            set_submodule(self.net, name, lean)  # the hook beside its layer runs it

    def forward(self, x: Tensor) -> Tensor:
        self.state["key"] = id(x)
        return self.net(x)


class Products(nn.Module):
    """Only the products of ``net`` (its ``nn.Linear`` and ``nn.Conv2d`` layers), each on
    the input it had when ``net`` ran on ``x``: what the network's time would be if
    nothing but the FLOPs that FlopCounterMode counts cost anything. Called with any
    argument, it runs them all in order."""

    def __init__(self, net: nn.Module, x: Tensor) -> None:
        super().__init__()
        layers = [m for m in net.modules() if type(m) in (nn.Linear, nn.Conv2d)]
        self.calls: list[tuple[nn.Module, Tensor]] = []
        hooks = [m.register_forward_pre_hook(lambda m, args: self.calls.append((m, args[0])))
                 for m in layers]  # fmt: skip
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()

    def forward(self, x: Tensor) -> Tensor:
        for layer, inputs in self.calls:
            layer.forward(inputs)  # the product alone, without what runs beside the layer
        return x


def networks(
    root: Path, seed: int, round_to: list[int]
) -> tuple[dict[str, nn.Module], dict[str, float], Tensor]:
    """The networks of one experiment folder: name -> network, name -> paper speedup,
    and the test images. Each method is compacted with each of ``round_to`` (a name
    gains ", /R" for R > 1); run-time DBB starts from the first."""
    nets: dict[str, nn.Module] = {}
    paper: dict[str, float] = {}
    data = None
    for method in METHOD_ORDER:
        folder = root / method / f"seed-{seed}"
        if method == "dbb" or not folder.is_dir():
            continue  # DBB lives in the bb folder
        stages = [method] if method != "bb" else ["bb", "preprune"]
        for stage in stages:
            if not (folder / f"{stage}.pt").is_file():
                continue
            _, stage, gated, data = load_stage(folder, stage, data)
            if "dense" not in nets:
                nets["dense"] = without_gates(gated)
                paper["dense"] = 1.0
            example = data.train_x[:256]
            x = data.test_x[:256]
            results = json.loads((folder / "results.json").read_text())["stages"]
            first = None  # run-time DBB starts from the first of round_to
            for r in round_to:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CompactWarning)
                    small = bbdrop.compact(gated, example, round_to=r)
                with torch.no_grad():
                    reference = gated(x)
                    difference = float((small(x) - reference).abs().max())
                scale = float(reference.abs().max())
                name = "DBB" if stage == "preprune" else method.upper()
                name += f", /{r}" if r > 1 else ""
                paper[name] = results["dbb" if stage == "preprune" else stage]["speedup"]
                print(f"  {name}: compacted; largest output difference on 256 test images "
                      f"{difference:.1e}, largest output {scale:.1f}")  # fmt: skip
                nets[name] = small
                first = small if first is None else first
            small = first
            if stage == "preprune":
                nets["DBB run-time"] = bbdrop.runtime_pruned(small, x[:2])
                singles = [data.test_x[i : i + 1] for i in range(SINGLES)]
                floor = Floor(small, singles)
                paper["DBB run-time"] = paper[name]
                with torch.no_grad():
                    fast = nets["DBB run-time"]
                    gap = max(float((fast(x[i : i + 1]) - gated(x[i : i + 1])).abs().max())
                              for i in range(SINGLES))  # fmt: skip
                print(f"  DBB run-time: largest difference at batch 1 {gap:.1e}")
    if data is None:
        raise SystemExit(f"no trained runs under {root}; run bbdrop reproduce first")
    if "DBB run-time" in nets:  # timed at batch 1 only: its inputs are those images
        nets["DBB floor"], paper["DBB floor"] = floor, float("nan")
    return nets, paper, data.test_x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the --out folder of bbdrop reproduce")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--round-to", default="1", help="compact(round_to=) values, e.g. 1,16")
    args = parser.parse_args()
    flush_denormals()
    if args.round_to.split(",")[0] != "1":
        parser.error("--round-to must start with 1: the goal compares with that network's FLOPs")
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    print(f"torch {torch.__version__}; machine: {machine()}; seed {args.seed}; "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    for experiment in args.experiments.split(","):
        root = args.runs / experiment
        if not root.is_dir():
            print(f"\n{experiment}: no runs under {root}, skipped")
            continue
        print(f"\n{experiment}")
        torch.set_num_threads(1)
        nets, paper, test_x = networks(root, args.seed, [int(r) for r in args.round_to.split(",")])
        floor = nets.get("DBB floor")
        singles = floor.inputs if floor is not None else [test_x[i : i + 1] for i in range(SINGLES)]
        dense_flops = flops(nets["dense"], singles[:1])
        counted = {n: dense_flops / flops(m, singles) if m is not floor else float("nan")
                   for n, m in nets.items()}  # fmt: skip
        measured: dict[tuple[int, int], dict[str, float]] = {}
        # the networks of goal 1 (run-time DBB runs its layers whole at large batches)
        compacted = [n for n, m in nets.items() if m is not floor and n != "DBB run-time"]
        for t in threads:
            torch.set_num_threads(t)
            for b in batches:
                xs = singles if b == 1 else [test_x[:b]]
                timed = {n: m for n, m in nets.items() if b == 1 or m is not floor}
                if b != 1:  # and each network's products alone, on their inputs here
                    timed |= {f"{n} products": Products(m, xs[0]) for n, m in nets.items()
                              if n in compacted}  # fmt: skip
                secs = latencies(timed, xs, rounds=args.rounds)
                measured[b, t] = {n: secs["dense"] / s for n, s in secs.items()}
                measured[b, t]["_dense_ms"] = 1e3 * secs["dense"]
                if b != 1:
                    alone = secs["dense products"]
                    measured[b, t] |= {f"{n} products": alone / secs[f"{n} products"]
                                       for n in compacted}  # fmt: skip
        head = " | ".join(f"batch {b}, {t} thr." for t in threads for b in batches)
        print(f"\n| network | FLOP speedup, paper | FLOP speedup, FlopCounterMode | {head} |")
        print("|---|---:|---:|" + "---:|" * len(threads) * len(batches))
        for n in nets:
            cells = " | ".join(f"{measured[b, t][n]:.2f}x" if n in measured[b, t] else ""
                               for t in threads for b in batches)  # fmt: skip
            flop = " | ".join("-" if x != x else f"{x:.2f}x" for x in (paper[n], counted[n]))
            print(f"| {n} | {flop} | {cells} |")
        dense = " | ".join(f"{measured[b, t]['_dense_ms']:.3f}" for t in threads for b in batches)
        print(f"| dense, ms per batch | | | {dense} |")
        rounds_to = [int(r) for r in args.round_to.split(",")]
        for b in batches:
            if b == 1:
                continue
            print(f"\nGoal 1 at batch {b}: measured speedup / FlopCounterMode speedup of the "
                  "network compacted without rounding (goal >= 0.7), the whole network and its "
                  "products alone, median of the thread counts")  # fmt: skip
            cols = [f"{what}{f', /{r}' if r > 1 else ''}"
                    for r in rounds_to for what in ("whole", "products alone")]  # fmt: skip
            print(f"\n| network | {' | '.join(cols)} |\n|---|" + "---:|" * len(cols))
            for n in [n for n in compacted[1:] if "," not in n]:
                cells = [statistics.median(measured[b, t][k] for t in threads) / counted[n]
                         for r in rounds_to for name in [n + (f", /{r}" if r > 1 else "")]
                         for k in (name, f"{name} products")]  # fmt: skip
                print(f"| {n} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
