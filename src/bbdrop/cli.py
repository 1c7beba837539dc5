"""The ``bbdrop`` command: the only place that parses arguments and prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from bbdrop import __version__


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bbdrop: --device cuda asked for, but torch sees no CUDA device; "
            "use --device cpu (or auto)"
        )
    return name


def _cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bbdrop.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        seed=args.seed,
        dense_epochs=args.dense_epochs,
        bb_epochs=args.bb_epochs,
        dbb_epochs=args.dbb_epochs,
        device=_device(args.device),
    )
    bars: dict[str, tqdm] = {}

    def progress(stage: str, epoch: int, epochs: int, loss: float) -> None:
        if stage not in bars:
            bars[stage] = tqdm(
                total=epochs,
                desc=f"{stage:>5}",
                unit="epoch",
                leave=True,
                disable=True if args.quiet else None,
                file=sys.stderr,
            )
        bar = bars[stage]
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
        if epoch == epochs:
            bar.close()

    print(
        f"bbdrop {__version__} demo: 8x8 digits (scikit-learn), MLP 64-128-64-10, "
        f"seed {cfg.seed}, device {cfg.device}"
    )
    results = run_demo(cfg, progress)
    names = list(results[0].units)
    units_title = f"units per gated layer ({'-'.join(names)})"
    header = f"{'stage':<6} {'error %':>8}  {units_title:<36} {'s':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        if r.stage == "dbb":
            units = "-".join(f"{v:.1f}" for v in r.units.values()) + " active"
        else:
            units = "-".join(f"{int(v)}" for v in r.units.values())
        print(f"{r.stage:<6} {r.error:>8.2f}  {units:<36} {r.seconds:>6.1f}")
    print(
        "BB: units whose E[pi] >= threshold. DBB: average over the test set of the units "
        "each example switches on (run-time pruning)."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bbdrop.demo import DemoConfig

    parser = argparse.ArgumentParser(
        prog="bbdrop",
        description="Bayesian structured sparsification with (dependent) beta-Bernoulli dropout.",
    )
    parser.add_argument("--version", action="version", version=f"bbdrop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="dense, BB and DBB on the embedded 8x8 digits (under a minute on 2 CPU cores)",
        description="Train a 64-128-64-10 MLP on scikit-learn's 8x8 digits densely, then with "
        "BB, then with DBB (BB frozen), and print test error and units kept per layer.",
    )
    d = DemoConfig()
    demo.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    for stage in ("dense", "bb", "dbb"):
        default = getattr(d, f"{stage}_epochs")
        demo.add_argument(
            f"--{stage}-epochs",
            type=int,
            default=default,
            help=f"epochs of the {stage} stage (default: {default})",
        )
    demo.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="default: auto (cuda when available)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"bbdrop: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
