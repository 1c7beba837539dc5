"""Make your ResNet 4x and 8x cheaper in FLOPs with one call each: ``bbdrop.sparsify``
with a budget, BB against VIB, on Fashion-MNIST, on a CPU (docs/sparsify.md).

The network is examples/resnet_fashion.py's: ResNet-18's layout at width 8, written
in plain PyTorch. It is pretrained densely, then for each method and budget::

    out = bbdrop.sparsify(net, (x, y), val=(x_val, y_val), method=m, budget=b, epochs=4)

gates it by coupled group, prunes it along a path to the budget with the method's
strength steered to carry the pruning, compacts it and reports. The validation
images are the last ``--val-size`` of Fashion-MNIST's training set (held out);
the test set is read once, for the last column. Nothing is tuned: the recipe's
defaults run as shipped.

Run::

    python examples/sparsify_resnet.py           # about 7 minutes on one CPU thread
    python examples/sparsify_resnet.py --quick   # about 2 minutes
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from resnet_fashion import ResNet  # the user's network, beside this file

import bbdrop
from bbdrop.train.loop import evaluate


def pretrain(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for epoch in range(epochs):
        if epoch == epochs - 1:  # the last epoch at a tenth of the rate
            for group in opt.param_groups:
                group["lr"] = 3e-4
        net.train()
        for i in torch.randperm(len(x)).split(100):
            loss = F.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3000 images, fewer epochs")
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--val-size", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=4, help="epochs of each sparsify call")
    p.add_argument("--budgets", default="0.25,0.125")
    p.add_argument("--methods", default="bb,vib")
    args = p.parse_args()
    if args.quick:
        args.train_size, args.val_size, args.epochs = 3000, 1000, 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    full = bbdrop.load_dataset("fashion-mnist")
    held = full.hold_out(args.val_size)  # test_x: the held-out training images
    train = (held.train_x[: args.train_size], held.train_y[: args.train_size])
    val, test = (held.test_x, held.test_y), (full.test_x, full.test_y)
    net = ResNet(width=8, blocks=2, classes=10, in_channels=1)
    t0 = time.perf_counter()
    pretrain(net, *train, epochs=2 if args.quick else 5)
    print(f"dense: pretrained in {time.perf_counter() - t0:.0f} s; validation error "
          f"{evaluate(net, *val):.2f}%, test error {evaluate(net, *test):.2f}%")  # fmt: skip
    header = (f"{'method':6} {'budget':>7} {'FLOPs':>7} {'val err %':>9} {'test err %':>10} "
              f"{'FLOP speedup':>12} {'measured':>8} {'removed':>7} {'seconds':>7}")  # fmt: skip
    rows = []
    for method in args.methods.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            t0 = time.perf_counter()
            out = bbdrop.sparsify(net, train, val=val, method=method, budget=budget,
                                  epochs=args.epochs)  # fmt: skip
            r = out.report
            removed = sum(t["removed"] for trace in r.steering.values() for t in trace)
            rows.append(f"{method:6} {budget:>7g} {r.cost:>7.4f} {r.error:>9.2f} "
                        f"{evaluate(out.compact, *test):>10.2f} {r.speedup:>11.2f}x "
                        f"{r.measured_speedup:>7.2f}x {removed:>7} "
                        f"{time.perf_counter() - t0:>7.0f}")  # fmt: skip
            print(rows[-1], flush=True)
    print()
    print(header)
    print("\n".join(rows))
    print("FLOPs: the compacted network's over the dense network's (batch 1); measured: "
          "dense time over compacted time at batch 64, one thread; removed: units the "
          "budget's path removed by rank (the rest the method pruned itself)")  # fmt: skip


if __name__ == "__main__":
    main()
