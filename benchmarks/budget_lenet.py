"""Does a FLOP budget cost accuracy? ``bbdrop.sparsify(budget=...)`` against the method's
own pruning at fixed strengths, on LeNet-500-300 and Fashion-MNIST (docs/sparsify.md).

LeNet-500-300 is pretrained for ``--pretrain`` epochs (Adam, 1e-3, batch 100) on the
first 50000 Fashion-MNIST training images; the last 10000 are held out, and every
error below is measured on them (the test set is not read). Then, for each budget,
``sparsify`` with the paper's placement for ``--epochs`` epochs; and for each
``--scales`` value, ``sparsify`` without a budget at that ``kl_scale``: the points
the method reaches on its own, to compare with at the same cost. One thread, seeded::

    python benchmarks/budget_lenet.py                      # BB: 1/4, 1/8, 1/16; scales 3, 10
    python benchmarks/budget_lenet.py --method vib --scales 1,10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import bbdrop


def pretrained(data: bbdrop.data.Dataset, epochs: int, cache: Path | None) -> torch.nn.Module:
    torch.manual_seed(0)
    net = bbdrop.create_model("lenet_500_300")
    if cache is not None and cache.exists():
        net.load_state_dict(torch.load(cache))
        return net
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = data.train_x, data.train_y
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(100):
            loss = torch.nn.functional.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    if cache is not None:
        torch.save(net.state_dict(), cache)
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="bb")
    p.add_argument("--budgets", default="0.25,0.125,0.0625")
    p.add_argument("--scales", default="3,10", help="kl_scale values without a budget")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--pretrain", type=int, default=5)
    p.add_argument("--cache", type=Path, default=None, help="keep the pretrained weights here")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = bbdrop.load_dataset("fashion-mnist").hold_out(10000)  # test_x: held-out training
    net = pretrained(data, args.pretrain, args.cache)
    train, val = (data.train_x, data.train_y), (data.test_x, data.test_y)
    runs = [("budget", float(b)) for b in args.budgets.split(",") if b]
    runs += [("kl_scale", float(s)) for s in args.scales.split(",") if s]
    print(f"{'':8} {'value':>7} {'cost':>7} {'error %':>8} {'steps (cost/path@scale)'}")
    for kind, value in runs:
        t0 = time.perf_counter()
        kwargs = {"budget": value} if kind == "budget" else {"kl_scale": value}
        out = bbdrop.sparsify(net, train, val=val, method=args.method, epochs=args.epochs,
                              placement="layers", **kwargs)  # fmt: skip
        r = out.report
        trace = " ".join(f"{t['cost']:.3f}/{t['path']:.3f}@{t['scale']:.2g}"
                         for t in r.steering.get(args.method, []))  # fmt: skip
        print(f"{kind:8} {value:>7g} {r.cost:>7.4f} {r.error:>8.2f} {trace}  "
              f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    print(f"dense error {r.dense_error:.2f}%")


if __name__ == "__main__":
    main()
