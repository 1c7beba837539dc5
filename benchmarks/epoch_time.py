"""Seconds per training epoch: bbdrop's gates against the authors' way of computing them.

One epoch of BB and of DBB training over Fashion-MNIST's 60,000 training images
(batch 100) with bbdrop's own loop (``train_stage``, the pipeline's), three
ways, in the same process, interleaved round by round:

* ``reference``: the gates as the authors' public code computes them
  (benchmarks/reference_gates.py: a Kumaraswamy draw,
  ``RelaxedBernoulli(...).rsample()``, a multiply);
* ``bbdrop``: bbdrop's gates, eager;
* ``bbdrop --compile``: bbdrop's gates, the training step through ``torch.compile``;
* ``dense`` and ``dense --compile``: the same network without gates (the
  pretraining stage), the floor that no gate implementation can go below.

Ratios are to the reference of the same network and stage, measured in the same
run. A first untimed round warms each variant up (and compiles); then each
round times one epoch of every variant in turn; medians over rounds::

    python benchmarks/epoch_time.py                          # both networks, 3 rounds
    python benchmarks/epoch_time.py --model lenet_500_300 --rounds 2

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from reference_gates import register
from torch import nn

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.data import Dataset, load_dataset
from bbdrop.threads import machine
from bbdrop.train.loop import train_stage

VARIANTS = ("reference", "bbdrop", "bbdrop --compile", "dense", "dense --compile")


def build(model_name: str, stage: str, variant: str) -> nn.Module:
    torch.manual_seed(0)
    model = bbdrop.create_model(model_name)
    if variant.startswith("dense"):
        return model
    if variant == "reference":
        bbdrop.attach_gates_(model, f"ref-{stage}")
    else:
        bbdrop.attach_gates_(model, "bb")
        if stage == "dbb":
            bbdrop.convert_gates_(model, "dbb", freeze_bb=True)
    return model


def epoch_timer(model_name: str, stage: str, variant: str, data: Dataset) -> Callable[[], float]:
    """A function that trains one more epoch of the variant and returns its seconds."""
    model = build(model_name, stage, variant)
    gen = torch.Generator().manual_seed(0)
    batches = data.train_batches(100, gen)

    def one_epoch() -> float:
        history = train_stage(
            model, batches, stage=stage, epochs=1, num_train=data.train_x.shape[0],
            optim=OptimConfig(), evaluate_on=(data.test_x[:100], data.test_y[:100]),
            generator=gen, compile=variant.endswith("--compile"),
        )  # fmt: skip
        return history[-1].seconds

    return one_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("lenet_500_300", "lenet5_caffe"), action="append")
    parser.add_argument("--stage", choices=("bb", "dbb"), action="append")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    args = parser.parse_args()
    register()
    data = load_dataset("fashion-mnist")
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"one training epoch, Fashion-MNIST (60,000 images), batch 100; median of "
          f"{args.rounds} interleaved rounds after a warm-up round")  # fmt: skip
    print(f"{'network':<14} {'stage':<5} {'variant':<17} {'s / epoch':>9} {'rounds':>22} "
          f"{'ratio':>6}")  # fmt: skip
    for model_name in args.model or ("lenet_500_300", "lenet5_caffe"):
        for stage in args.stage or ("bb", "dbb"):
            timers = {v: epoch_timer(model_name, stage, v, data) for v in VARIANTS}
            for timer in timers.values():  # warm-up: caches, allocator, compilation
                timer()
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for variant, timer in timers.items():
                    times[variant].append(timer())
            ref = statistics.median(times["reference"])
            for variant in VARIANTS:
                t = statistics.median(times[variant])
                rounds = " ".join(f"{s:.2f}" for s in times[variant])
                print(f"{model_name:<14} {stage:<5} {variant:<17} {t:>9.2f} {rounds:>22} "
                      f"{t / ref:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
