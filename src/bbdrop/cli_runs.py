"""The run commands of ``bbdrop`` (:mod:`bbdrop.cli`): run, train, reproduce, sweep,
front and table, each command's arguments beside its handler, with the argument
types and common options (settings, device, threads, compile) they take.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from bbdrop import validate
from bbdrop.cli_common import _add_threads, _count, _epoch_bars
from bbdrop.precision import PRECISIONS


def _args_run(cmd: argparse.ArgumentParser, one_stage: bool = False) -> None:
    cmd.add_argument("config", metavar="CONFIG")
    if one_stage:
        cmd.add_argument("--stage", required=True, help="e.g. pretrain, bb, dbb, preprune")
    cmd.add_argument(
        "--out", type=_folder, default=None, help="run directory (default: runs/NAME/seed-N)"
    )
    _add_common(cmd)


def _args_train(cmd: argparse.ArgumentParser) -> None:
    _args_run(cmd, one_stage=True)


def _print_run(results: dict[str, Any]) -> None:
    from bbdrop.budget import Budget
    from bbdrop.experiments import markdown_table

    print(markdown_table([results]))
    for name, stage in results.get("stages", {}).items():
        b = stage.get("budget")
        if b is None:
            continue
        if "asked" in b:  # a parameter budget: both fractions reached
            asked = Budget(**b["asked"])
            reached = f"{b['flops']:.4g} of the FLOPs and {b['params']:.4g} of the parameters"
        else:
            asked, reached = Budget(flops=b["goal"]), f"{b['cost']:.4g}"
        print(f"budget, {name}: {asked} asked, {reached} reached; {b['settled']} unit(s) "
              "removed past the method's rule at the end")


def _cmd_run(args: argparse.Namespace) -> int:
    from bbdrop.experiments import experiment_config
    from bbdrop.pipeline import pipeline_stages, run_pipeline

    cfg = experiment_config(args.config, _overrides(args))
    out = Path(args.out) if args.out else Path("runs") / cfg.name / f"seed-{cfg.seed}"
    names = [s.name for s in pipeline_stages(cfg)]
    stages = names if args.command == "run" else [args.stage]

    def header() -> None:  # once the run has passed its checks
        print(
            f"bbdrop {args.command} {cfg.name}: {cfg.model.name} on {cfg.data.name}, "
            f"seed {cfg.seed}, stages {' '.join(stages)}"
            f"{', compiled' if cfg.compile else ''} -> {out}",
            flush=True,
        )

    results = run_pipeline(cfg, out, stages=stages, progress=_epoch_bars(args.quiet),
                           on_start=header)  # fmt: skip
    _print_run(results)  # under torchrun, process 0's reaches the terminal (bbdrop.cli)
    print(f"config, checkpoints and results.json in {out}")
    return 0


def _args_reproduce(rep: argparse.ArgumentParser) -> None:
    rep.add_argument("experiment", metavar="EXPERIMENT")
    rep.add_argument("--seeds", nargs="+", action=_SeedsAction, default=[1, 2, 3, 4, 5],
                     help="e.g. 1 2 3 or 1,2,3 (default: 1 2 3 4 5)")  # fmt: skip
    rep.add_argument(
        "--out", type=_folder, default="runs", help="root of the run directories (default: runs)"
    )
    rep.add_argument("--no-figures", action="store_true", help="skip the figures")
    rep.add_argument(
        "--methods", type=_names, default=None, metavar="M,M,...",
        help="compare these methods (e.g. svd,ssl,sbp,l0,vib,bb,dbb) from the same pretrained "
        "network per seed: one table row each (default: the experiment's own stages)",
    )  # fmt: skip
    rep.add_argument(
        "--jobs", type=_count(1), default=1, metavar="J",
        help="run J seeds at once, in separate processes, dividing the threads among them "
        "(default: 1)",
    )  # fmt: skip
    _add_common(rep)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from bbdrop.experiments import reproduce

    done = reproduce(
        args.experiment,
        args.seeds,
        args.out,
        _overrides(args),
        progress=lambda seed: _epoch_bars(args.quiet, f"seed {seed} "),
        figures=not args.no_figures,
        jobs=args.jobs,
        methods=args.methods,
    )
    print(done["table"])
    for path in done["figures"]:
        print(f"figure: {path}")
    return 0


def _args_sweep(sw: argparse.ArgumentParser) -> None:
    sw.add_argument("experiment", metavar="EXPERIMENT")
    sw.add_argument("--method", required=True, help="a registered method, e.g. sbp")
    sw.add_argument(
        "--scales", type=_scales, default=[0.1, 0.3, 1.0, 3.0, 10.0],
        help="multiples of the configuration's regulariser weight (default: 0.1,0.3,1,3,10)",
    )  # fmt: skip
    sw.add_argument(
        "--budgets", type=_budgets, default=None, metavar="B,B,...",
        help="instead of scales: one run per FLOP budget (fractions of the dense FLOPs, "
        "e.g. 0.25,0.125,0.0625), each steered to it, compared with the method's own "
        "front from an earlier sweep (docs/sparsify.md)",
    )  # fmt: skip
    sw.add_argument("--seeds", nargs="+", action=_SeedsAction, default=[1], help="default: 1")
    sw.add_argument("--validation", type=_count(1), default=10000,
                    help="held-out training examples (default: 10000)")  # fmt: skip
    sw.add_argument("--out", type=_folder, default="runs", help="default: runs")
    sw.add_argument("--jobs", type=_count(1), default=1, metavar="J", help="runs at once")
    _add_common(sw)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from bbdrop.experiments import SELECTION_MARGIN, scale_name, sweep
    from bbdrop.experiments.budgets import budget_sweep

    run = budget_sweep if args.budgets is not None else sweep
    done = run(
        args.experiment,
        args.method,
        args.budgets if args.budgets is not None else args.scales,
        args.seeds,
        args.out,
        _overrides(args),
        validation=args.validation,
        progress=lambda seed: _epoch_bars(args.quiet, f"seed {seed} "),
        jobs=args.jobs,
    )
    if args.budgets is not None:
        return _print_budgets(done, args)
    record = done["record"]
    print(f"{'scale':>8} {'seed':>4} {'val. error %':>12} {'speedup':>8}   units")
    for p in record["points"]:
        units = "-".join(f"{v:.0f}" for v in p["units"].values())
        print(
            f"{scale_name(p['scale'])[1:]:>8} {p['seed']:>4} {p['error']:>12.2f} "
            f"{p['speedup']:>8.2f}x  {units}"
        )
    print(
        f"chosen scale {scale_name(record['chosen_scale'])[1:]} (highest median validation "
        f"speedup with error <= dense + {SELECTION_MARGIN} points); its configuration: "
        f"{Path(args.out) / record['name'] / 'sweep' / args.method / 'chosen.toml'}"
    )
    for path in done["figures"]:
        print(f"figure: {path}")
    return 0


def _print_budgets(done: dict[str, Any], args: argparse.Namespace) -> int:
    print(done["table"])
    record = done["record"]
    where = Path(args.out) / record["name"] / "budget" / args.method / "budget.json"
    print(f"budget runs: {where}")
    for path in done["figures"]:
        print(f"figure: {path}")
    return 0


def _args_front(fr: argparse.ArgumentParser) -> None:
    fr.add_argument("sweeps", metavar="SWEEPS", help="a sweep folder, <out>/<experiment>/sweep")
    fr.add_argument("--tested", metavar="RUNS",
                    help="a reproduce folder, <out>/<experiment>")  # fmt: skip
    fr.add_argument("--out", type=_folder, help="where to write the figures (default: SWEEPS)")
    fr.add_argument("--prefix", type=_prefix, default="",
                    help="of the figures' file names (default: none)")  # fmt: skip


def _cmd_front(args: argparse.Namespace) -> int:
    from bbdrop.experiments import tested_runs, write_front

    sweeps = Path(args.sweeps)
    if not any(sweeps.glob("*/sweep.json")):
        raise ValueError(
            f"{sweeps} holds no <method>/sweep.json; give the sweep folder bbdrop sweep "
            "wrote, <out>/<experiment>/sweep"
        )
    tested = tested_runs(args.tested) if args.tested else None
    for path in write_front(sweeps, tested, args.out, args.prefix):
        print(f"figure: {path}")
    return 0


def _args_table(tb: argparse.ArgumentParser) -> None:
    tb.add_argument("runs", metavar="RUNS", help="a reproduce folder, <out>/<experiment>")


def _cmd_table(args: argparse.Namespace) -> int:
    from bbdrop.experiments import markdown_table, tested_runs

    folder = Path(args.runs)
    runs = tested_runs(folder)
    print(markdown_table(runs, f"{folder.name}, {len(runs)} seed(s)"))
    return 0


# -- the argument types and common options of the run commands -----------------------
def _scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"scales must be numbers like 0.1,1,10, got {text!r}"
        ) from None
    if not scales or not all(validate.is_number(x) and x > 0 for x in scales):
        raise argparse.ArgumentTypeError(f"scales must be finite numbers > 0, got {text!r}")
    return scales


def _budgets(text: str) -> list[float]:
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        budgets = []
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise argparse.ArgumentTypeError(
            f"budgets are fractions of the dense FLOPs in (0, 1] like 0.25,0.125, got {text!r}"
        )
    return budgets


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", ",").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be integers like 1,2,3, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


class _SeedsAction(argparse.Action):
    """``--seeds 1 2 3`` or ``--seeds 1,2,3``; a KEY=VALUE token after the seeds is a setting."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
        values: Any, option_string: str | None = None,
    ) -> None:  # fmt: skip
        settings = [v for v in values if "=" in v]
        try:  # "1 2,3" is "1,2,3"
            seeds = _seeds(",".join(v for v in values if "=" not in v))
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument --seeds: {err}")
        setattr(namespace, self.dest, seeds)
        namespace.overrides = [*getattr(namespace, "overrides", []), *settings]


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.overrides)
    if args.device is not None:
        extra.append(f"device={args.device}")
    if args.compile:
        extra.append("compile=true")
    if args.precision is not None:
        extra.append(f"precision={args.precision}")
    if args.threads is not None:
        extra.append(f"threads={args.threads}")
    return extra


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name, e.g. sbp,bb,dbb")
    return names


def _folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("give a folder, not an empty string")
    return text


def _prefix(text: str) -> str:
    if "/" in text or os.sep in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"a prefix of file names cannot name a folder, got {text!r}; use --out for that"
        )
    return text


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override any setting, e.g. optim.lr=1e-3 epochs.sparsify=5 data.data_dir=/data",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="where to train (default: the config's, auto = cuda when available)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads(p, None, "the config's threads; 0 there: 1 for small networks, else every core")
    p.add_argument(
        "--compile",
        action="store_true",
        help="train through torch.compile (the config's compile = true): faster epochs after "
        "a compilation of tens of seconds; needs a C++ compiler on the CPU",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="the forward passes in bf16 (CPU, GPU) or fp16 (GPU) under autocast, the gates "
        "in float32 (default: the config's precision, float32)",
    )
