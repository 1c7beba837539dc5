"""Wall time of one training epoch of each stage, on the CPU protocol's data.

For each network, one epoch of the dense (pretrain), BB and DBB stages over
Fashion-MNIST's 60,000 training images (batch 100, the pipeline's own
training loop, no checkpoint writing), each timed separately, with the
authors' public code's times on this machine beside them (issue 3):

    python benchmarks/epoch_time.py                     # both networks
    python benchmarks/epoch_time.py --model lenet_500_300 --repeats 3

Run it on an otherwise idle machine: the figures are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.data import load_dataset
from bbdrop.train.loop import train_stage

# Seconds per training epoch of the authors' public code on this machine (issue 3).
AUTHORS = {
    "lenet_500_300": {"pretrain": 5.9, "bb": 14.2, "dbb": 22.0},
    "lenet5_caffe": {"pretrain": 34.0, "bb": 48.2, "dbb": 53.5},
}


def one_epoch(model_name: str, stage: str, data, repeats: int) -> float:
    torch.manual_seed(0)
    model = bbdrop.create_model(model_name)
    if stage != "pretrain":
        bbdrop.attach_gates_(model, "bb")
    if stage == "dbb":
        bbdrop.convert_gates_(model, "dbb", freeze_bb=True)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats):
        history = train_stage(
            model, stage, lambda epoch: data.train_batches(100, gen), data.train_x.shape[0],
            (data.test_x[:100], data.test_y[:100]), OptimConfig(), 1, None, gen,
        )  # fmt: skip
        times.append(history[-1].seconds)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(AUTHORS), action="append")
    parser.add_argument("--repeats", type=int, default=1, help="epochs timed per stage (median)")
    args = parser.parse_args()
    data = load_dataset("fashion-mnist")
    print(
        f"one training epoch, Fashion-MNIST, batch 100, CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats}"
    )
    print(f"{'network':<14} {'stage':<9} {'bbdrop (s)':>11} {'authors (s)':>12} {'ratio':>6}")
    for model_name in args.model or sorted(AUTHORS, reverse=True):
        for stage, theirs in AUTHORS[model_name].items():
            t = one_epoch(model_name, stage, data, args.repeats)
            print(f"{model_name:<14} {stage:<9} {t:>11.1f} {theirs:>12.1f} {t / theirs:>6.2f}")


if __name__ == "__main__":
    main()
