"""The ``bbdrop`` command: the only place that parses arguments and prints.

Here: the table of its commands (:data:`COMMANDS`), the parser built from it and
:func:`main`. Each command's arguments and handler are in :mod:`bbdrop.cli_runs`
(run, train, reproduce, sweep, front, table) and :mod:`bbdrop.cli_tools` (compact,
list, demo), what they share in :mod:`bbdrop.cli_common`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bbdrop import __version__
from bbdrop.cli_runs import (
    _args_front,
    _args_reproduce,
    _args_run,
    _args_sweep,
    _args_table,
    _args_train,
    _cmd_front,
    _cmd_reproduce,
    _cmd_run,
    _cmd_sweep,
    _cmd_table,
)
from bbdrop.cli_tools import (
    _args_compact,
    _args_demo,
    _args_list,
    _cmd_compact,
    _cmd_demo,
    _cmd_list,
)


# -- the commands, each with its arguments and handler, in one table -----------------
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
    from bbdrop.train.divergence import DivergenceError
    from bbdrop.train.loop import CompileError
    from bbdrop.workers import Terminated

    rank = int(os.environ.get("RANK", "0"))  # torchrun's process number
    if rank > 0:  # process 0 prints the output
        sys.stdout = open(os.devnull, "w")
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader left early (`bbdrop table runs/x | head`): quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # as a process killed by SIGPIPE
    except (
        ValueError, OSError, ImportError, CompileError, CheckpointError, DivergenceError
    ) as err:  # fmt: skip
        if rank == 0:
            print(f"bbdrop: error: {err}", file=sys.stderr)
        elif isinstance(err, (OSError, ImportError)):  # this process's own
            print(f"bbdrop: error (process {rank}): {err}", file=sys.stderr)
        # the rest comes from the same command on the same data in every process:
        # process 0 says it once (docs/distributed.md)
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
