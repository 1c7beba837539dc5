"""The other commands of ``bbdrop`` (:mod:`bbdrop.cli`): compact, list and demo, each
command's arguments beside its handler.
"""

from __future__ import annotations

import argparse

from bbdrop import __version__
from bbdrop.cli_common import _add_threads, _count, _epoch_bars
from bbdrop.config import MAX_SEED


def _args_compact(cp: argparse.ArgumentParser) -> None:
    cp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/NAME/seed-1")
    cp.add_argument("--stage", help="e.g. bb, dbb, preprune, sbp (default: the last finished "
                    "stage with gates)")  # fmt: skip
    cp.add_argument("--out", help="the file to write (default: RUN_DIR/STAGE.compact.safetensors)")
    cp.add_argument("--onnx", metavar="FILE", help="also export the network as ONNX to FILE")
    cp.add_argument("--round-to", type=int, default=1, metavar="N",
                    help="keep a multiple of N units per layer (or all): some widths run "
                    "faster (docs/compact.md, 'Widths'); default 1")  # fmt: skip


def _cmd_compact(args: argparse.Namespace) -> int:
    from bbdrop.experiments import compact_run

    done = compact_run(args.run_dir, args.stage, args.out, args.onnx, args.round_to)
    widths, units = done["widths"], done["units"]
    print(f"stage {done['stage']}: units per gated layer, kept by the gates -> left in the "
          "compacted network")  # fmt: skip
    for name, width in widths.items():
        print(f"  {name:<24} {units[name]:>6} -> {width}")
    before, after = done["parameters"], done["parameters_compact"]
    print(f"parameters: {before} -> {after} ({100 * after / before:.1f}%); largest output "
          f"difference to the gated network on {done['examples']} training examples: "
          f"{done['max_difference']:.2e}")  # fmt: skip
    for path in done["files"]:
        print(f"wrote {path}")
    if ":" in done["model"]:  # a network of the user's own: the file holds no model name
        module, _, factory = done["model"].partition(":")
        print(f"load it with bbdrop.load_compact(path, template={factory}(num_classes="
              f"{done['num_classes']})), {factory} from {module}")  # fmt: skip
    return 0


def _args_list(lst: argparse.ArgumentParser) -> None:
    pass


def _cmd_list(args: argparse.Namespace) -> int:
    from bbdrop.experiments import experiment_config, list_experiments

    for name in list_experiments():
        cfg = experiment_config(name)
        e = cfg.epochs
        print(
            f"{name:<32} {cfg.model.name:<14} {cfg.data.name:<14} "
            f"epochs {e.pretrain}/{e.sparsify}/{e.dbb} (pretrain/{cfg.gate.method}/dbb)"
        )
    return 0


def _args_demo(demo: argparse.ArgumentParser) -> None:
    from bbdrop.demo import DemoConfig

    d = DemoConfig()
    demo.add_argument(
        "--seed", type=_count(0, MAX_SEED), default=d.seed, help=f"random seed (default: {d.seed})"
    )
    for stage in ("dense", "bb", "dbb"):
        default = getattr(d, f"{stage}_epochs")
        demo.add_argument(f"--{stage}-epochs", type=_count(1), default=default,
                          help=f"epochs of the {stage} stage (default: {default})")  # fmt: skip
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="default: auto (cuda when available)")  # fmt: skip
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads(demo, d.threads, f"{d.threads}: the MLP is too small to share")


def _cmd_demo(args: argparse.Namespace) -> int:

    from bbdrop.demo import DemoConfig, run_demo
    from bbdrop.pipeline import resolve_device

    cfg = DemoConfig(
        seed=args.seed,
        dense_epochs=args.dense_epochs,
        bb_epochs=args.bb_epochs,
        dbb_epochs=args.dbb_epochs,
        device=str(resolve_device(args.device)),
        threads=args.threads,
    )
    progress = _epoch_bars(args.quiet)
    print(
        f"bbdrop {__version__} demo: 8x8 digits (scikit-learn), MLP 64-128-64-10, "
        f"seed {cfg.seed}, device {cfg.device}, {cfg.threads} thread"
        f"{'s' if cfg.threads > 1 else ''}"
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
