"""What several commands of ``bbdrop`` share (:mod:`bbdrop.cli`): the progress
bars of the commands that train, the option type of a count within bounds, and the
``--threads`` option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from bbdrop.train.loop import Progress


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
