"""The ``bbdrop`` command: the only place that parses arguments and prints."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bbdrop import __version__, validate
from bbdrop.config import MAX_SEED
from bbdrop.train.loop import Progress


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


def _epoch_bars(quiet: bool, prefix: str = "") -> Progress:
    """A progress callback: one tqdm bar per stage, advanced per epoch."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(stage: str, record: Any, epochs: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(
                total=epochs,
                initial=record.epoch - 1,
                desc=f"{prefix}{stage:>8}",
                unit="epoch",
                disable=True if quiet else None,
                file=sys.stderr,
            )
        bar = bars[stage]
        units = record.active or record.units
        bar.set_postfix(
            loss=f"{record.loss:.3f}",
            error=f"{record.error:.2f}%",
            units="-".join(f"{v:.0f}" for v in units.values()) or "all",
        )
        bar.update(1)
        if record.epoch == epochs:
            bar.close()

    return progress


def _print_run(results: dict[str, Any]) -> None:
    from bbdrop.experiments import markdown_table

    print(markdown_table([results]))


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
    _print_run(results)
    print(f"config, checkpoints and results.json in {out}")
    return 0


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


def _cmd_sweep(args: argparse.Namespace) -> int:
    from bbdrop.experiments import SELECTION_MARGIN, scale_name, sweep

    done = sweep(
        args.experiment,
        args.method,
        args.scales,
        args.seeds,
        args.out,
        _overrides(args),
        validation=args.validation,
        progress=lambda seed: _epoch_bars(args.quiet, f"seed {seed} "),
        jobs=args.jobs,
    )
    record = done["record"]
    print(f"{'scale':>8} {'seed':>4} {'val. error %':>12} {'speedup':>8}   units")
    for p in record["points"]:
        units = "-".join(f"{v:.0f}" for v in p["units"].values())
        print(f"{scale_name(p['scale'])[1:]:>8} {p['seed']:>4} {p['error']:>12.2f} "
              f"{p['speedup']:>8.2f}x  {units}")
    print(
        f"chosen scale {scale_name(record['chosen_scale'])[1:]} (highest median validation "
        f"speedup with error <= dense + {SELECTION_MARGIN} points); its configuration: "
        f"{Path(args.out) / record['name'] / 'sweep' / args.method / 'chosen.toml'}"
    )
    for path in done["figures"]:
        print(f"figure: {path}")
    return 0


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


def _cmd_table(args: argparse.Namespace) -> int:
    from bbdrop.experiments import markdown_table, tested_runs

    folder = Path(args.runs)
    runs = tested_runs(folder)
    print(markdown_table(runs, f"{folder.name}, {len(runs)} seed(s)"))
    return 0


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
    return 0


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


def _count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def _add_threads(p: argparse.ArgumentParser, default: int | None, auto: str) -> None:
    from bbdrop.threads import available_cores

    p.add_argument(
        "--threads",
        type=_count(1, available_cores()),
        default=default,
        metavar="N",
        help=f"CPU threads to compute with (default: {auto})",
    )


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


# -- each command's arguments, registered in one table ---------------------------------
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


def _args_sweep(sw: argparse.ArgumentParser) -> None:
    sw.add_argument("experiment", metavar="EXPERIMENT")
    sw.add_argument("--method", required=True, help="a registered method, e.g. sbp")
    sw.add_argument(
        "--scales", type=_scales, default=[0.1, 0.3, 1.0, 3.0, 10.0],
        help="multiples of the configuration's regulariser weight (default: 0.1,0.3,1,3,10)",
    )  # fmt: skip
    sw.add_argument("--seeds", nargs="+", action=_SeedsAction, default=[1], help="default: 1")
    sw.add_argument("--validation", type=_count(1), default=10000,
                    help="held-out training examples (default: 10000)")  # fmt: skip
    sw.add_argument("--out", type=_folder, default="runs", help="default: runs")
    sw.add_argument("--jobs", type=_count(1), default=1, metavar="J", help="runs at once")
    _add_common(sw)


def _args_front(fr: argparse.ArgumentParser) -> None:
    fr.add_argument("sweeps", metavar="SWEEPS", help="a sweep folder, <out>/<experiment>/sweep")
    fr.add_argument("--tested", metavar="RUNS",
                    help="a reproduce folder, <out>/<experiment>")  # fmt: skip
    fr.add_argument("--out", type=_folder, help="where to write the figures (default: SWEEPS)")
    fr.add_argument("--prefix", type=_prefix, default="",
                    help="of the figures' file names (default: none)")  # fmt: skip


def _args_table(tb: argparse.ArgumentParser) -> None:
    tb.add_argument("runs", metavar="RUNS", help="a reproduce folder, <out>/<experiment>")


def _args_compact(cp: argparse.ArgumentParser) -> None:
    cp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/NAME/seed-1")
    cp.add_argument("--stage", help="e.g. bb, dbb, preprune, sbp (default: the last finished "
                    "stage with gates)")  # fmt: skip
    cp.add_argument("--out", help="the file to write (default: RUN_DIR/STAGE.compact.safetensors)")
    cp.add_argument("--onnx", metavar="FILE", help="also export the network as ONNX to FILE")
    cp.add_argument("--round-to", type=int, default=1, metavar="N",
                    help="keep a multiple of N units per layer (or all): some widths run "
                    "faster (docs/compact.md, 'Widths'); default 1")  # fmt: skip


def _args_list(lst: argparse.ArgumentParser) -> None:
    pass


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


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    description: str | None
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    _Command("run", "a whole pipeline: pretrain, BB, DBB (BB frozen), pre-prune",
             "Run (or resume) every stage of CONFIG (a shipped experiment name, see 'bbdrop "
             "list', or a .toml file) in one run directory.", _args_run, _cmd_run),
    _Command("train", "one stage, from the previous stage's checkpoint",
             "Train one stage of CONFIG in its run directory; the stage before it must have "
             "finished there.", _args_train, _cmd_run),
    _Command("reproduce", "an experiment over seeds: results, the paper's table, figures",
             "Run EXPERIMENT once per seed (resumable), then write OUT/NAME/table.md "
             "(medians over seeds, the paper's layout) and the figures.",
             _args_reproduce, _cmd_reproduce),
    _Command("sweep", "a method's regularisation strength on held-out data, and the choice",
             "Train METHOD from EXPERIMENT's pretrained network once per scale of its "
             "regulariser weight, on all but the last --validation training examples, measure "
             "on those (the test set is not read), choose a scale by the documented rule and "
             "write its configuration (chosen.toml) and the front figure.",
             _args_sweep, _cmd_sweep),
    _Command("front", "the fronts of finished sweeps, with the test-set runs on top",
             "Draw front.png (validation error against FLOP speedup, one curve per "
             "method of SWEEPS/<method>/sweep.json) and units.png into SWEEPS; with --tested, "
             "the test-set runs of a bbdrop reproduce folder are drawn on top, one star per "
             "seed, and their units kept per layer are shown.", _args_front, _cmd_front),
    _Command("table", "the table of a reproduce folder's results, without the checkpoints",
             "Print the paper-layout table (medians over seeds) of the results.json "
             "files under RUNS (RUNS/seed-*/ or RUNS/<method>/seed-*/): for results kept "
             "without their checkpoints, such as docs/runs/.", _args_table, _cmd_table),
    _Command("compact", "a finished run as a smaller network: pruned units removed, one file",
             "Remove the pruned units of a stage of RUN_DIR for good (bbdrop.compact) "
             "and write the smaller network as safetensors weights with its architecture in "
             "the file's header, loaded by bbdrop.load_compact without unpickling code.",
             _args_compact, _cmd_compact),
    _Command("list", "the shipped experiments", None, _args_list, _cmd_list),
    _Command("demo", "dense, BB and DBB on the embedded 8x8 digits (under a minute on 2 CPU "
             "cores)", "Train a 64-128-64-10 MLP on scikit-learn's 8x8 digits densely, then "
             "with BB, then with DBB (BB frozen), and print test error and units kept per "
             "layer.", _args_demo, _cmd_demo),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``bbdrop`` parser: one sub-command per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="bbdrop",
        description="Bayesian structured sparsification with (dependent) beta-Bernoulli dropout.",
    )
    parser.add_argument("--version", action="version", version=f"bbdrop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        cmd = sub.add_parser(command.name, help=command.help, description=command.description)
        command.arguments(cmd)
        cmd.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may also come after the options (argparse only takes
    # positionals in one run): collect them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    late = [e for e in extra if "=" in e and not e.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [e for e in extra if e not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from bbdrop.train.checkpoint import CheckpointError
    from bbdrop.train.loop import CompileError, DivergenceError
    from bbdrop.workers import Terminated

    try:
        return args.func(args)
    except BrokenPipeError:  # the reader left early (`bbdrop table runs/x | head`): quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # as a process killed by SIGPIPE
    except (
        ValueError, OSError, ImportError, CompileError, CheckpointError, DivergenceError
    ) as err:  # fmt: skip
        print(f"bbdrop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "bbdrop: interrupted; checkpoints are written after every epoch: run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return 130
    except Terminated:  # SIGTERM while runs went on in worker processes: stopped with them
        print("bbdrop: terminated; checkpoints are written after every epoch: run the same "
              "command again to resume", file=sys.stderr)  # fmt: skip
        return 143


if __name__ == "__main__":
    raise SystemExit(main())
