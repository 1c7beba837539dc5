"""Is attaching gates to a trained network safe? Every method, on a ResNet and on LeNet5.

Pretrains two networks densely on Fashion-MNIST (1x28x28): the ResNet-18-style
network of tests/networks.py (BasicBlocks with batch norm, ``--width`` channels
in the first stage, ``in_channels=1``) and the paper's LeNet5-Caffe. Then, for
each method (DBB: BB gates attached, then converted with ``freeze_bb=True`` as in
the two-stage scheme) and each placement (the ResNet with ``"groups"``, given an
example batch; LeNet5 with the paper's ``"layers"`` and with ``"groups"``), it
prints the network's own eval error, the error right after attaching, and the
error after one short epoch of training with the objective
``CE + total_kl / N`` (N = 60000, Fashion-MNIST's training set; the library's
Adam: weights lr 1e-3 with weight decay 1e-4, gates lr 1e-2), with the mean
training CE of that epoch's last 10 steps and the share of units kept after it.

Each method runs with its defaults (the authors' start settings) and with
:data:`bbdrop.safety.PRETRAINED_SETTINGS`::

    python benchmarks/attach_safety.py                        # both tables, ~5 min on 1 thread
    python benchmarks/attach_safety.py --settings pretrained --methods bb,l0
    python benchmarks/attach_safety.py --set bb.init_b=0.01   # try a start setting
    python benchmarks/attach_safety.py --cache /tmp/nets.pt   # pretrain once, reuse after

``attached - dense`` above :data:`bbdrop.safety.TOLERANCE` (0.5 points) is marked
``!``: :func:`bbdrop.safety.check_attach` would warn there. Everything runs on
the CPU, one thread, seeded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.gates import Gate, settings_type
from bbdrop.safety import PRETRAINED_SETTINGS, TOLERANCE, check_attach, eval_error
from bbdrop.train.optimizer import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from networks import ResNet

METHODS = ("bb", "dbb", "svd", "ssl", "sbp", "l0", "vib")
N = 60000  # the KL term's divisor: Fashion-MNIST's training set
BATCH = 100
# The settings of BB's gates; the rest of DBB's entry is DBB's own (given to convert_gates_)
BB_SETTINGS = {f.name for f in dataclasses.fields(settings_type("bb"))}


@dataclass
class Data:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load(eval_size: int, seed: int) -> Data:
    ds = bbdrop.load_dataset("fashion-mnist", download=False)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds.train_y), generator=g)
    return Data(ds.train_x[order], ds.train_y[order], ds.test_x[:eval_size], ds.test_y[:eval_size])


def batches(x: Tensor, y: Tensor, start: int, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` batches of 100 from example ``start`` on (wrapping around)."""
    for s in range(steps):
        i = (start + s * BATCH) % (len(y) - BATCH + 1)
        yield x[i : i + BATCH], y[i : i + BATCH]


def train(model: nn.Module, data: Iterator[tuple[Tensor, Tensor]], with_kl: bool) -> list[float]:
    """The library's optimiser and objective over ``data``; the training CE of each step."""
    opt, _ = build_optimizer(model, OptimConfig(), epochs=1)
    stepping = [m for m in model.modules() if isinstance(m, Gate) and m.steps_after_optimiser]
    model.train()
    ces = []
    for xb, yb in data:
        ce = nn.functional.cross_entropy(model(xb), yb)
        loss = ce + bbdrop.total_kl(model) / N if with_kl else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for gate in stepping:
            gate.after_step(opt.param_groups[0]["lr"], N)
        ces.append(float(ce.detach()))
    return ces


def networks(width: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        "resnet": lambda: ResNet(width=width, in_channels=1),
        "lenet5": lambda: bbdrop.create_model("lenet5_caffe"),
    }


def pretrained(args: argparse.Namespace, data: Data) -> dict[str, nn.Module]:
    """The two networks, trained densely (or read from ``--cache``)."""
    builders = networks(args.width)
    key = {"width": args.width, "seed": args.seed, "steps": args.pretrain_steps}
    if args.cache and Path(args.cache).exists():
        saved = torch.load(args.cache)
        if saved["key"] == key:
            nets = {}
            for name, build in builders.items():
                nets[name] = build()
                nets[name].load_state_dict(saved[name])
            return nets
    nets = {}
    for name, build in builders.items():
        torch.manual_seed(args.seed)
        nets[name] = build()
        t = time.perf_counter()
        train(nets[name], batches(data.train_x, data.train_y, 0, args.pretrain_steps), False)
        print(f"pretrained {name}: {args.pretrain_steps} steps of {BATCH} in "
              f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
    if args.cache:
        torch.save({"key": key, **{n: m.state_dict() for n, m in nets.items()}}, args.cache)
    return nets


def attach(
    net: nn.Module, method: str, settings: dict[str, Any], placement: str, example: Tensor
) -> None:
    where: dict[str, Any] = {"example": example} if placement == "groups" else {}
    if method == "dbb":  # BB gates, converted as in the two-stage scheme
        bb = {k: v for k, v in settings.items() if k in BB_SETTINGS}
        bbdrop.attach_gates_(net, "bb", **where, **bb)
        own = {k: v for k, v in settings.items() if k not in BB_SETTINGS}
        bbdrop.convert_gates_(net, "dbb", freeze_bb=True, **own)
    else:
        bbdrop.attach_gates_(net, method, **where, **settings)


def last10(ces: list[float]) -> float:
    """The mean training CE of the last 10 steps."""
    return sum(ces[-10:]) / len(ces[-10:])


def kept_share(net: nn.Module) -> float:
    layers = list(bbdrop.gated_layers(net))
    kept = sum(g.gate.num_kept() for _, g in layers)
    return 100.0 * kept / sum(g.gate.num_units for _, g in layers)


@torch.no_grad()
def mean_gate(net: nn.Module) -> float:
    """The test-time value of the gates (DBB: its E_q[pi] part), averaged over all units."""
    values = [g.gate.gate_values().float().flatten() for _, g in bbdrop.gated_layers(net)]
    return float(torch.cat(values).mean())


def parse_sets(items: list[str]) -> dict[str, dict[str, float]]:
    """``method.setting=value`` items as {method: {setting: value}}."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, setting = key.partition(".")
        if not (method and setting and value):
            raise SystemExit(f"--set takes method.setting=value, got {item!r}")
        out.setdefault(method, {})[setting] = float(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--settings", default="defaults,pretrained",
                   help="defaults, pretrained, or both (comma-separated)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="METHOD.SETTING=VALUE",
                   help="a start setting of the 'pretrained' rows (repeatable)")  # fmt: skip
    p.add_argument("--nets", default="resnet:groups,lenet5:layers,lenet5:groups")
    p.add_argument("--width", type=int, default=8, help="the ResNet's first-stage channels")
    p.add_argument("--pretrain-steps", type=int, default=400, help="dense steps of 100")
    p.add_argument("--steps", type=int, default=50, help="steps of 100 in the short epoch")
    p.add_argument("--eval", type=int, default=2000, help="test examples evaluated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="", help="a file for the pretrained networks")
    args = p.parse_args()
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    overrides = parse_sets(args.set)

    data = load(args.eval, args.seed)
    nets = pretrained(args, data)
    start = args.pretrain_steps * BATCH  # the short epoch reads the examples after those
    example = data.train_x[:8]
    print(f"\nFashion-MNIST, {args.eval} test examples; short epoch = {args.steps} steps of "
          f"{BATCH}; ResNet width {args.width}; seed {args.seed}; torch {torch.__version__}, "
          "1 thread")  # fmt: skip
    columns = ("network", 15), ("settings", 10), ("method", 6), ("dense %", 8), \
        ("attached %", 10), ("delta", 7), ("epoch %", 8), ("CE", 6), ("kept %", 7), \
        ("gate", 5), ("s", 4)  # fmt: skip

    def row(*cells: str) -> str:
        widths = [w for _, w in columns]
        return " ".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}"
                        for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # fmt: skip

    header = row(*(name for name, _ in columns))
    for spec in args.nets.split(","):
        name, _, placement = spec.partition(":")
        net0 = nets[name]
        dense = eval_error(net0, data.test_x, data.test_y)
        control = copy.deepcopy(net0)
        torch.manual_seed(args.seed)
        ces = train(control, batches(data.train_x, data.train_y, start, args.steps), False)
        print(f"\n{header}\n{'-' * len(header)}")
        control_error = eval_error(control, data.test_x, data.test_y)
        print(row(spec, "-", "dense", f"{dense:.2f}", "", "", f"{control_error:.2f}",
                  f"{last10(ces):.3f}", "", "", ""))  # fmt: skip
        for which in args.settings.split(","):
            for method in methods:
                settings = {} if which == "defaults" else dict(PRETRAINED_SETTINGS.get(method, {}))
                if which != "defaults":
                    settings.update(overrides.get(method, {}))
                t = time.perf_counter()
                net = copy.deepcopy(net0)
                torch.manual_seed(args.seed)
                attach(net, method, settings, placement, example)
                after = eval_error(net, data.test_x, data.test_y)
                torch.manual_seed(args.seed)
                ces = train(net, batches(data.train_x, data.train_y, start, args.steps), True)
                epoch = eval_error(net, data.test_x, data.test_y)
                ce = last10(ces)
                flag = "!" if check_attach(dense, after, method) else " "
                print(row(spec, which, method, f"{dense:.2f}", f"{after:.2f}",
                          f"{after - dense:+.2f}{flag}", f"{epoch:.2f}",
                          f"{ce:.3f}" if math.isfinite(ce) else "nan", f"{kept_share(net):.1f}",
                          f"{mean_gate(net):.2f}", f"{time.perf_counter() - t:.0f}"),
                      flush=True)  # fmt: skip
    print(f"\n! : attached - dense > {TOLERANCE} points (bbdrop.safety.check_attach warns). "
          "epoch %: after the short epoch (dense: trained on without gates). CE: mean "
          "training CE of its last 10 steps. kept %: units kept after it, over all gates; "
          "gate: their mean test-time value then (DBB: its E_q[pi] part).")  # fmt: skip


if __name__ == "__main__":
    main()
