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
for run-time DBB, averaged over the batch-1 images). "DBB masks alone" times only
the arithmetic of DBB's masks on the inputs they see at batch 1, no product: the
floor under run-time DBB at batch 1. Before timing, each compacted network's output
is checked against its gated network on the test images::

    python benchmarks/inference.py /work/runs                          # all found
    python benchmarks/inference.py runs --experiments lenet-500-300-fashion-cpu \\
        --threads 1 --batches 1

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import bbdrop
from bbdrop.compaction import CompactWarning, DependentMask, without_gates
from bbdrop.experiments import METHOD_ORDER, load_stage
from bbdrop.metrics import latencies
from bbdrop.threads import machine
from bbdrop.train.denormals import flush_denormals

EXPERIMENTS = ("lenet-500-300-fashion-cpu", "lenet5-caffe-fashion-cpu")
SINGLES = 64  # test images timed one at a time


def flops(model: nn.Module, xs: list[Tensor]) -> float:
    """Matmul and convolution FLOPs per example, averaged over ``xs``."""
    total = 0
    for x in xs:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        total += counter.get_total_flops()
    return total / sum(len(x) for x in xs)


class MasksOnly(nn.Module):
    """The floor of run-time DBB: only its masks' arithmetic, on the inputs the masks of
    ``net`` see for each of ``inputs`` (recorded once), without any layer's product."""

    def __init__(self, net: nn.Module, inputs: list[Tensor]) -> None:
        super().__init__()
        self.masks = [m for m in net.modules() if isinstance(m, DependentMask)]
        seen: dict[int, list[Tensor]] = {}
        hooks = [m.register_forward_pre_hook(
            lambda m, args: seen.setdefault(self._key, []).append(args[0]))
            for m in self.masks]  # fmt: skip
        self.inputs = inputs
        with torch.no_grad():
            for x in inputs:
                self._key = id(x)
                net(x)
        for h in hooks:
            h.remove()
        self.seen = seen

    def forward(self, x: Tensor) -> Tensor:
        for mask, h in zip(self.masks, self.seen[id(x)], strict=True):
            mask.mask(h)
        return x


def networks(root: Path, seed: int) -> tuple[dict[str, nn.Module], dict[str, float], Tensor]:
    """The networks of one experiment folder: name -> network, name -> paper speedup,
    and the test images."""
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CompactWarning)
                small = bbdrop.compact(gated, example)
            x = data.test_x[:256]
            with torch.no_grad():
                reference = gated(x)
                difference = float((small(x) - reference).abs().max())
            scale = float(reference.abs().max())
            name = "DBB" if stage == "preprune" else method.upper()
            results = json.loads((folder / "results.json").read_text())["stages"]
            paper[name] = results["dbb" if stage == "preprune" else stage]["speedup"]
            print(f"  {name}: compacted; largest output difference on 256 test images "
                  f"{difference:.1e}, largest output {scale:.1f}")  # fmt: skip
            nets[name] = small
            if stage == "preprune":
                nets["DBB run-time"] = bbdrop.runtime_pruned(small, x[:2])
                singles = [data.test_x[i : i + 1] for i in range(SINGLES)]
                floor = MasksOnly(small, singles)
                paper["DBB run-time"] = paper[name]
                with torch.no_grad():
                    fast = nets["DBB run-time"]
                    gap = max(float((fast(x[i : i + 1]) - gated(x[i : i + 1])).abs().max())
                              for i in range(SINGLES))  # fmt: skip
                print(f"  DBB run-time: largest difference at batch 1 {gap:.1e}")
    if data is None:
        raise SystemExit(f"no trained runs under {root}; run bbdrop reproduce first")
    if "DBB run-time" in nets:  # timed at batch 1 only: its inputs are those images
        nets["DBB masks alone"], paper["DBB masks alone"] = floor, float("nan")
    return nets, paper, data.test_x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the --out folder of bbdrop reproduce")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    flush_denormals()
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
        nets, paper, test_x = networks(root, args.seed)
        floor = nets.get("DBB masks alone")
        singles = floor.inputs if floor is not None else [test_x[i : i + 1] for i in range(SINGLES)]
        dense_flops = flops(nets["dense"], singles[:1])
        counted = {n: dense_flops / flops(m, singles) if m is not floor else float("nan")
                   for n, m in nets.items()}  # fmt: skip
        measured: dict[tuple[int, int], dict[str, float]] = {}
        for t in threads:
            torch.set_num_threads(t)
            for b in batches:
                xs = singles if b == 1 else [test_x[:b]]
                timed = {n: m for n, m in nets.items() if b == 1 or m is not floor}
                secs = latencies(timed, xs, rounds=args.rounds)
                measured[b, t] = {n: secs["dense"] / s for n, s in secs.items()}
                measured[b, t]["_dense_ms"] = 1e3 * secs["dense"]
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
        if 256 in batches:
            ratios = {n: statistics.median(measured[256, t][n] for t in threads) / counted[n]
                      for n in nets if n != "dense" and nets[n] is not floor}  # fmt: skip
            print("\nmeasured speedup at batch 256 / FlopCounterMode speedup (goal >= 0.7): "
                  + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items()))  # fmt: skip


if __name__ == "__main__":
    main()
