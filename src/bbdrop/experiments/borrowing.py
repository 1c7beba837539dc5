"""Borrowing of finished stages between runs: which runs' pretraining (or BB stage) is
the same computation, and the copy of such a checkpoint into another run's folder, so
that every method and every sweep of an experiment starts from one pretrained network,
trained once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bbdrop.config import RunConfig, load_recorded_config, to_dict
from bbdrop.distributed import main_only
from bbdrop.files import write_atomic


def _borrow_stages(root: Path, pattern: str, cfg: RunConfig, folder: Path) -> None:
    """Copy into ``folder`` the finished stages of another run under ``root`` (its folders
    matching ``pattern``) that are the same computation as ``cfg``'s: its pretrained
    network, and its BB checkpoint when BB too is the same (settings, and a byte-identical
    pretrained network). Stages ``folder`` has are kept. So every sweep and every method
    of an experiment starts from one pretrained network, trained once, and a sweep of
    DBB's weight starts from the BB of the BB sweep's matching point."""
    main_only(lambda: _borrow(root, pattern, cfg, folder))  # under torchrun: process 0


def _borrow(root: Path, pattern: str, cfg: RunConfig, folder: Path) -> None:
    for stage, same in (("pretrain", _same_pretraining), ("bb", _same_bb)):
        target = folder / f"{stage}.pt"
        if target.exists():
            continue
        for source in sorted(root.glob(f"{pattern}/{stage}.pt")):
            if source.parent.resolve() == folder.resolve():
                continue
            try:
                other = load_recorded_config(source.parent / "config.toml")
            except (OSError, ValueError):  # no readable record of how it was trained
                continue
            if other.seed != cfg.seed or not same(other, cfg):
                continue
            if stage != "pretrain" and not _same_bytes(source.parent / "pretrain.pt",
                                                       folder / "pretrain.pt"):  # fmt: skip
                continue
            _copy_checkpoint(source, target)
            break


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether files ``a`` and ``b`` both exist and hold the same bytes."""
    return a.exists() and b.exists() and a.read_bytes() == b.read_bytes()


def _copy_checkpoint(source: Path, target: Path) -> None:
    """A finished stage's checkpoint copied to another run's folder (written atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, source.read_bytes())


def _same_pretraining(a: RunConfig, b: RunConfig) -> bool:
    """Whether the pretraining stage of ``a`` and ``b`` is the same computation (the
    settings of the later stages aside)."""

    def pretraining(cfg: RunConfig) -> dict[str, Any]:
        d = to_dict(cfg)
        for key in ("name", "gate", "seed", "budget"):  # a budget steers the gated stages
            d.pop(key)
        d["epochs"] = d["epochs"]["pretrain"]
        for key in ("gate_lr", "decay_gates"):  # the gates' optimiser: no gates yet
            d["optim"].pop(key)
        return d

    return pretraining(a) == pretraining(b)


def _same_bb(a: RunConfig, b: RunConfig) -> bool:
    """Whether ``a`` and ``b`` run BB and their stages up to BB's end are the same
    computation (they differ only in the DBB stage's settings or length, as in a sweep
    of DBB's weight): then the BB checkpoint of one serves the other."""

    def through_bb(cfg: RunConfig) -> dict[str, Any]:
        d = to_dict(cfg)
        for key in ("name", "seed"):
            d.pop(key)
        d["gate"].pop("dbb_kl_scale")
        # under a FLOP budget, BB before a DBB stage is steered above it (stage_goals); a
        # parameter budget alone is BB's to meet, as in a BB run
        followed = cfg.epochs.dbb > 0 and cfg.budget.flops is not None
        d["epochs"]["dbb"] = followed
        return d

    return all(c.gate.method == "bb" for c in (a, b)) and through_bb(a) == through_bb(b)
