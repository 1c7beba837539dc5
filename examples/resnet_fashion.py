"""Sparsify a ResNet you wrote yourself: BB, DBB and VIB on Fashion-MNIST, on a CPU.

A user's network, written below with plain PyTorch (nothing from bbdrop's model
zoo): a ResNet-18-style network (four stages of BasicBlocks, batch norm, 1x1
strided shortcuts where the shape changes) at width 8 for 1x28x28 images. The
script

1. pretrains it densely;
2. for each of BB, DBB and VIB puts one gate per coupled group of channels on a
   copy (``bbdrop.attach_gates_(net, method, example=x)``: a residual stream
   shares one gate, a convolution's channels are gated after its batch norm, and
   the gates start near 1, so the trained network keeps its accuracy), and trains
   it briefly with cross-entropy + ``bbdrop.total_kl(net) / N``, re-estimating the
   batch norms' running statistics after each epoch (:func:`recalibrate`). DBB is the
   paper's two-stage scheme: it starts from the chosen BB network
   (``bbdrop.convert_gates_(net, "dbb", freeze_bb=True)``) and is trained briefly,
   which also gives it the running statistics it needs at test time;
3. compacts each (``bbdrop.compact``: the smaller plain network, same outputs)
   and prints a table against the dense network: test error, parameters, FLOPs
   and FLOP speedup (``bbdrop.network_costs``, per example), DBB's expected FLOP
   speedup when the layers behind its gates skip the units it switches off, and
   the measured speedup of the compacted networks (batch 64, one thread, timed in
   interleaved rounds by ``bbdrop.metrics.latencies``); then the units each
   group keeps.

How settings are chosen (fixed before any run; the test set is read only to
fill the final table):

* The last ``--val-size`` images of Fashion-MNIST's training set are held out
  (the validation set); training uses the first ``--train-size`` of the rest,
  and N in ``total_kl / N`` is that number.
* The optimiser, learning rates and epochs are fixed in advance (the defaults
  below). Each method's KL weight and gate learning rate (``METHODS``) were
  chosen by ``--grid``, which tries every setting in ``GRID`` on the validation
  set alone and applies the rule below to all of them together.
* A method's network is checkpointed after every epoch of its stage, and the
  checkpoint kept is chosen on the validation set: the one with the fewest FLOPs
  among those whose validation error is at most the dense network's validation
  error plus ``--tolerance`` percentage points (ties: the lower validation
  error); when none is within the bound, the one with the lowest validation
  error. FLOPs here are ``network_costs(...).expected_flops`` on the validation
  images: the compacted network's, and for DBB its expected run-time cost.

Run::

    python examples/resnet_fashion.py            # about 5 minutes on one CPU thread
    python examples/resnet_fashion.py --quick    # about a minute: fewer images and epochs
    python examples/resnet_fashion.py --grid     # how METHODS was chosen: about 19 minutes

The results, and what they do and do not show: docs/any-network.md.

``--synthetic`` replaces Fashion-MNIST by small random images with a pattern
per class (no files needed; the tests use it). Fashion-MNIST is found, or
downloaded, by ``bbdrop.load_dataset`` (docs/data.md).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbdrop
from bbdrop.metrics import latencies


# -- the network: a user's own ResNet ------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Four stages of ``blocks`` BasicBlocks, ``width`` channels in the first stage,
    doubling per stage (``blocks=2``: ResNet-18's layout)."""

    def __init__(
        self, width: int = 8, blocks: int = 2, classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i in range(4):
            cout = width * 2**i
            stage = [
                BasicBlock(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1)
                for j in range(blocks)
            ]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# -- data ------------------------------------------------------------------------------------
@dataclass
class Data:
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor  # empty with --no-test
    test_y: Tensor
    name: str


def fashion_mnist(train_size: int, val_size: int, test_size: int) -> Data:
    """Fashion-MNIST: the last ``val_size`` training images held out, the first
    ``train_size`` of the others for training, the first ``test_size`` test images."""
    full = bbdrop.load_dataset("fashion-mnist")
    ds = full.hold_out(val_size)  # its test_x, test_y: the held-out training images
    x, y = ds.train_x[:train_size], ds.train_y[:train_size]
    test_x, test_y = full.test_x[:test_size], full.test_y[:test_size]
    return Data(x, y, ds.test_x, ds.test_y, test_x, test_y, "Fashion-MNIST")


def synthetic(
    train_size: int, val_size: int, test_size: int, size: int = 12, seed: int = 0
) -> Data:
    """Random 1 x size x size images: a fixed pattern per class (10) plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, size, size, generator=g)

    def split(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        return patterns[y] + 0.5 * torch.randn(n, 1, size, size, generator=g), y

    (a, b), (c, d), (e, f) = split(train_size), split(val_size), split(test_size)
    return Data(a, b, c, d, e, f, f"synthetic {size}x{size}")


# -- settings --------------------------------------------------------------------------------
@dataclass
class Settings:
    epochs_dense: int = 5  # the last at lr_dense / 10
    epochs: int = 4  # BB and VIB
    epochs_dbb: int = 2
    batch: int = 100
    lr_dense: float = 3e-3  # pretraining
    lr: float = 1e-3  # the weights while the gates train
    tolerance: float = 2.0  # percentage points of validation error over dense
    seed: int = 0


# Each method's KL weight (kl_scale: the objective is CE + kl_scale * KL / N) and its gates'
# learning rate: what `--grid` chose on the validation set (docs/any-network.md, "How the
# settings were found"). The gates' start values are the library's for a trained network
# (bbdrop.safety.PRETRAINED_SETTINGS); DBB starts from the chosen BB network.
METHODS = {
    "bb": {"kl_scale": 10.0, "gate_lr": 0.03},
    "dbb": {"kl_scale": 10.0, "gate_lr": 0.03},
    "vib": {"kl_scale": 10.0, "gate_lr": 0.1},
}
# What `--grid` tries, declared before it was run.
GRID = {
    "bb": [{"kl_scale": k, "gate_lr": g} for k in (10.0, 30.0, 100.0) for g in (0.03, 0.1)],
    "dbb": [{"kl_scale": k, "gate_lr": g} for k in (1.0, 10.0) for g in (0.01, 0.03)],
    "vib": [{"kl_scale": k, "gate_lr": g} for k in (10.0, 30.0, 100.0) for g in (0.03, 0.1)],
}


# -- training and evaluation -------------------------------------------------------------
def train(
    net: nn.Module,
    data: Data,
    epochs: int,
    s: Settings,
    lr: float,
    gate_lr: float = 0.0,
    after_epoch=None,
) -> None:
    """Adam on cross-entropy + total_kl / N (N: the training images): the weights at
    ``lr``, the gates' parameters at ``gate_lr``; ``after_epoch(epoch)`` after each."""
    x, y, n = data.train_x, data.train_y, len(data.train_x)
    gates = [p for name, p in net.named_parameters() if ".gate." in name and p.requires_grad]
    weights = [p for name, p in net.named_parameters() if ".gate." not in name]
    opt = torch.optim.Adam([{"params": weights, "lr": lr}, {"params": gates, "lr": gate_lr}])
    g = torch.Generator().manual_seed(s.seed)
    for epoch in range(1, epochs + 1):
        net.train()
        for i in torch.randperm(n, generator=g).split(s.batch):
            loss = F.cross_entropy(net(x[i]), y[i]) + bbdrop.total_kl(net) / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(epoch)


@torch.no_grad()
def error(net: nn.Module, x: Tensor, y: Tensor, batch: int = 500) -> float:
    """Test-time error in percent (eval mode)."""
    net.eval()
    wrong = sum(
        int((net(xb).argmax(1) != yb).sum())
        for xb, yb in zip(x.split(batch), y.split(batch), strict=True)
    )
    return 100.0 * wrong / len(x)


@torch.no_grad()
def recalibrate(net: nn.Module, x: Tensor, batch: int = 500) -> None:
    """Re-estimate the batch norms' running statistics on ``x`` with the gates at their
    test-time values. While the gates train, their values move faster than the running
    averages follow, and behind a dozen batch norms the lag compounds (here, VIB after an
    epoch in a --quick trial: 56.6% validation error before, 19.2% after)."""
    net.eval()
    norms = {m: m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
        m.train()
    for xb in x.split(batch):
        net(xb)
    for m, momentum in norms.items():
        m.momentum = momentum
    net.eval()


@dataclass
class Checkpoint:
    setting: dict
    epoch: int
    val_error: float
    flops: float  # expected FLOPs per example of the compacted network
    net: nn.Module


def choose(points: list[Checkpoint], bound: float) -> Checkpoint:
    """The rule of the module docstring: fewest FLOPs within the validation bound
    (ties: lower validation error), else the lowest validation error."""
    ok = [c for c in points if c.val_error <= bound]
    if ok:
        return min(ok, key=lambda c: (c.flops, c.val_error))
    return min(points, key=lambda c: c.val_error)


def sparsify(method: str, start: nn.Module, setting: dict, data: Data, epochs: int, s: Settings):
    """Gate a copy of ``start`` with ``method`` (DBB: convert its BB gates), train it for
    ``epochs`` and return a checkpoint after each epoch. Seeded afresh, so that a setting
    gives the same network however many were tried before it."""
    torch.manual_seed(s.seed)
    net, example = copy.deepcopy(start), data.val_x[:8]
    if method == "dbb":
        bbdrop.convert_gates_(net, "dbb", freeze_bb=True, kl_scale=setting["kl_scale"])
    else:
        bbdrop.attach_gates_(net, method, example=example, kl_scale=setting["kl_scale"])
    points = []

    def record(epoch: int) -> None:
        recalibrate(net, data.train_x[:2000])
        flops = bbdrop.network_costs(net, example, data.val_x).expected_flops
        val = error(net, data.val_x, data.val_y)
        points.append(Checkpoint(setting, epoch, val, flops, copy.deepcopy(net)))

    train(net, data, epochs, s, s.lr, setting["gate_lr"], after_epoch=record)
    return points


# -- the run and its table ---------------------------------------------------------------
@dataclass
class Row:
    method: str
    val_error: float
    test_error: float  # nan without a test set
    parameters: int
    flops: int
    expected_flops: float  # DBB: the layers behind its gates skip the units switched off
    network: nn.Module  # what was timed: the dense or the compacted network
    kept: dict[str, str]  # per group: units kept (DBB: and on per example)
    speedup: float = float("nan")


def run(data: Data, s: Settings, methods: dict, width: int, blocks: int, rounds: int, log=print):
    """Pretrain, sparsify with each method (each setting in ``methods[method]``), keep
    the checkpoint :func:`choose` picks, compact it and measure: one row per network,
    dense first; and per gated group its width and the modules that share its gate."""
    torch.manual_seed(s.seed)
    dense = ResNet(width, blocks, 10, data.train_x.shape[1])
    t0 = time.perf_counter()
    train(dense, data, s.epochs_dense - 1, s, s.lr_dense)
    train(dense, data, 1, s, s.lr_dense / 10)  # the last epoch at a tenth, to settle
    dense_val = error(dense, data.val_x, data.val_y)
    bound = dense_val + s.tolerance
    log(
        f"dense: {time.perf_counter() - t0:.0f} s, validation error {dense_val:.2f}%, "
        f"bound for the sparse networks {bound:.2f}%"
    )
    inputs = data.test_x if len(data.test_x) else data.val_x  # to count and time on
    example, d = inputs[:8], bbdrop.measure(dense, inputs[:1])
    test = error(dense, data.test_x, data.test_y) if len(data.test_x) else math.nan
    rows, chosen = [Row("dense", dense_val, test, d.parameters, d.flops, d.flops, dense, {})], {}
    for method, settings in methods.items():
        start = chosen["bb"] if method == "dbb" else dense  # DBB: the two-stage scheme
        epochs = s.epochs_dbb if method == "dbb" else s.epochs
        points = []
        for setting in settings:
            t0 = time.perf_counter()
            points += (new := sparsify(method, start, setting, data, epochs, s))
            trace = ", ".join(f"{p.val_error:.2f}% {p.flops:.3g}" for p in new)
            log(
                f"{method} {setting}: {time.perf_counter() - t0:.0f} s; after each epoch, "
                f"validation error and FLOPs: {trace}"
            )
        best = choose(points, bound)
        chosen[method] = best.net
        log(f"{method}: chose {best.setting}, epoch {best.epoch}")
        c = bbdrop.network_costs(best.net, example, inputs)
        small = bbdrop.compact(best.net, example)
        test = error(small, data.test_x, data.test_y) if len(data.test_x) else math.nan
        kept = {
            g.name: f"{g.units}" + ("" if g.active is None else f" ({g.active:.1f})")
            for g in c.groups
        }
        rows.append(
            Row(method, best.val_error, test, c.parameters, c.flops, c.expected_flops, small, kept)
        )
    t = latencies({r.method: r.network for r in rows}, inputs[:64], rounds=rounds)
    for r in rows:
        r.speedup = t["dense"] / t[r.method]
    groups = {
        name: (layer.gate.num_units, 1 + len(layer.gate.shared_with))
        for name, layer in bbdrop.gated_layers(chosen[next(iter(methods))])
    }
    return rows, groups


def table(rows: list[Row], groups: dict[str, tuple[int, int]]) -> str:
    """The results as text: one line per network, then the units kept per group."""
    d = rows[0]
    lines = [
        f"{'method':7} {'val err %':>9} {'test err %':>10} {'params':>8} {'FLOPs':>10} "
        f"{'FLOP speedup':>12} {'expected':>8} {'measured':>8}"
    ]
    for r in rows:
        test = "-" if math.isnan(r.test_error) else f"{r.test_error:.2f}"
        lines.append(
            f"{r.method:7} {r.val_error:>9.2f} {test:>10} {r.parameters:>8} {r.flops:>10} "
            f"{d.flops / r.flops:>11.2f}x {d.flops / r.expected_flops:>7.2f}x "
            f"{r.speedup:>7.2f}x"
        )
    sparse = rows[1:]
    lines += [
        "",
        f"{'group (gate on)':16} {'modules':>7} {'units':>5} "
        + " ".join(f"{r.method:>11}" for r in sparse),
    ]
    for name, (width, modules) in groups.items():
        cells = " ".join(f"{r.kept.get(name, '-'):>11}" for r in sparse)
        lines.append(f"{name:16} {modules:>7} {width:>5} {cells}")
    return "\n".join(lines) + (
        "\nFLOPs: matmul and convolution FLOPs per example of the compacted network "
        "(bbdrop.network_costs); expected: with the layers behind DBB's gates skipping the "
        "units it switches off, averaged over the images; measured: dense time / compacted "
        "network's time at batch 64, one forward pass, interleaved rounds.\n"
        "modules: the batch norms whose outputs the group's gate multiplies (a residual "
        "stream: several); (x.y): DBB's units switched on per example, on average"
    )


def machine() -> str:
    """The CPU model, its cores and the load averages: what the timings ran beside."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "CPU"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "-"
    return f"{cpu}, {os.cpu_count()} cores, load average {load}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="3000 training, 1000 validation, 2000 test images; 2-2-1 epochs",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="random 12x12 images with a pattern per class instead of Fashion-MNIST",
    )
    p.add_argument(
        "--no-test", action="store_true", help="leave the test set out (validation errors only)"
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help="try every setting in GRID, validation only (implies --no-test)",
    )
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--val-size", type=int, default=4000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--epochs-dense", type=int, default=Settings.epochs_dense)
    p.add_argument("--epochs", type=int, default=Settings.epochs, help="BB and VIB")
    p.add_argument("--epochs-dbb", type=int, default=Settings.epochs_dbb)
    p.add_argument("--batch", type=int, default=Settings.batch)
    p.add_argument("--lr-dense", type=float, default=Settings.lr_dense)
    p.add_argument("--lr", type=float, default=Settings.lr, help="weights, with the gates")
    p.add_argument("--gate-lr", type=float, help="every method's gate lr (default: METHODS)")
    p.add_argument("--kl-scale", type=float, help="every method's KL weight (default: METHODS)")
    p.add_argument("--tolerance", type=float, default=Settings.tolerance)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--blocks", type=int, default=2, help="BasicBlocks per stage")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.test_size = 3000, 1000, 2000
        args.epochs_dense, args.epochs, args.epochs_dbb = 2, 2, 1
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    s = Settings(
        args.epochs_dense,
        args.epochs,
        args.epochs_dbb,
        args.batch,
        args.lr_dense,
        args.lr,
        args.tolerance,
        args.seed,
    )
    given = {k: getattr(args, k) for k in ("kl_scale", "gate_lr") if getattr(args, k) is not None}
    tried = GRID if args.grid else {m: [v] for m, v in METHODS.items()}
    methods = {m: [{**v, **given} for v in vs] for m, vs in tried.items()}
    load = synthetic if args.synthetic else fashion_mnist
    data = load(args.train_size, args.val_size, 0 if args.no_test or args.grid else args.test_size)
    print(
        f"ResNet (4 stages x {args.blocks} BasicBlocks, width {args.width}) on {data.name}: "
        f"{len(data.train_x)} training, {len(data.val_x)} validation, {len(data.test_x)} "
        f"test images; torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n"
        f"machine: {machine()}"
    )
    rows, groups = run(data, s, methods, args.width, args.blocks, args.rounds)
    print(f"machine after timing: {machine()}\n\n{table(rows, groups)}")
    return rows


if __name__ == "__main__":
    main()
