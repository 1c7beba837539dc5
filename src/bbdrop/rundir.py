"""The run folder: its lock, its checks, and the files a run keeps in it.

A run folder holds the recorded configuration (``config.toml``), the final
checkpoint of every finished stage (``<stage>.pt``), an in-progress checkpoint
of an unfinished one (``<stage>.last.pt``, written by the training loop) and
the figures of the finished stages (``results.json``). This module checks that
a folder can take a run (:func:`_check_out_dir`, :func:`_check_recorded_config`,
:func:`_check_earlier_stages`), holds it for one process (:func:`_run_lock`),
reads and writes those files, and puts a folder back as it was when a run wrote
nothing but its start (:func:`_note_start`, :func:`_undo_start_if_untouched`).

What goes into a stage's record is :mod:`bbdrop.stage_figures`'s job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bbdrop.config import RunConfig, load_recorded_config, to_dict, to_toml
from bbdrop.files import json_bytes, write_atomic
from bbdrop.stage_figures import _stage_result
from bbdrop.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from bbdrop.train.loop import get_rng, set_rng


# -- checks before anything is written --------------------------------------------------
def _check_out_dir(out: Path) -> None:
    """ValueError unless ``out`` is a writable folder or can be made one."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        what = "is a file" if existing == out else f"is under {existing}, a file"
        raise ValueError(f"output {out} {what}, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output {out}: cannot write in {existing}; choose another --out")


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the output folder {out}: {err.strerror}; choose another --out"
        ) from None


def _check_recorded_config(cfg: RunConfig, out: Path) -> None:
    """ValueError if ``out`` holds a run of another configuration."""
    path = out / "config.toml"
    if path.exists():
        recorded = load_recorded_config(path)
        # the device, the data location and the threads may differ between machines
        where = dataclasses.replace(
            recorded.data,
            data_dir=cfg.data.data_dir,
            download=cfg.data.download,
            verify=cfg.data.verify,
        )
        recorded = dataclasses.replace(recorded, device=cfg.device, threads=cfg.threads, data=where)
        if recorded != cfg:
            keys = _differences(to_dict(recorded), to_dict(cfg))
            raise ValueError(
                f"{out} holds a run with another configuration ({path}: "
                f"{', '.join(keys)} differ); use another output directory, or remove that "
                "one to start afresh"
            )


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configuration dicts."""
    out = []
    for key in dict.fromkeys([*a, *b]):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}")
    return out


def _check_earlier_stages(out: Path, names: Sequence[str], wanted: Sequence[str]) -> None:
    """ValueError when a wanted stage starts from a stage that is neither wanted nor
    finished in ``out``."""
    for i, name in enumerate(names):
        later = [s for s in wanted if names.index(s) > i]
        if name not in wanted and later and not (out / f"{name}.pt").exists():
            raise ValueError(
                f"stage {later[0]!r} starts from the {name!r} checkpoint, and {out} has "
                f"none; run that stage first (bbdrop train --stage {name})"
            )


# -- holding the folder, and undoing a start --------------------------------------------
@contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the ``with`` block: a second process in the same folder is
    refused instead of racing the first for its checkpoints. The lock is the OS's
    (``flock``), released when the process ends however it ends; where there is no
    ``fcntl`` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        f = open(out / ".lock", "a+")  # closed by the with block below
    except OSError as err:
        raise ValueError(f"cannot open the lock file {out / '.lock'} ({err.strerror}); remove "
                         "it if it is not a file, or use another output folder") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another bbdrop process is running in {out}; wait for it to finish, or use "
                "another output folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class _Start:
    """What a run folder was before a run started in it: what undoing the start restores."""

    made: list[Path]  # the lock file and the folders the start creates, innermost first
    recorded: Path  # the folder's config.toml
    before: bytes | None  # its bytes; None: there was none
    listing: set[str]  # the folder's entries; empty: there was no folder


def _note_start(out: Path) -> _Start:
    """How ``out`` is before a run starts in it (and creates it, its lock and its record)."""
    made = [p for p in (out / ".lock", out, *out.parents) if not p.exists()]
    recorded = out / "config.toml"
    before = recorded.read_bytes() if recorded.is_file() else None
    listing = set(os.listdir(out)) if out.is_dir() else set()
    return _Start(made, recorded, before, listing)


def _undo_start_if_untouched(out: Path, start: _Start) -> None:
    """Undo the start (:func:`_undo_start`) of a run that wrote nothing in ``out`` but its
    record and its lock."""
    if set(os.listdir(out)) <= start.listing | {"config.toml", ".lock"}:
        _undo_start(out, start.made, start.recorded, start.before)


def _undo_start(out: Path, made: Sequence[Path], recorded: Path, before: bytes | None) -> None:
    """Put ``out`` back as it was before a run that wrote nothing but its start: the
    recorded configuration restored (or removed); the lock file and the folders this
    run made (``made``, innermost first) removed, folders only when empty."""
    if before is None:
        recorded.unlink(missing_ok=True)
    elif recorded.read_bytes() != before:
        write_atomic(recorded, before)
    for path in made:
        with contextlib.suppress(OSError):
            path.rmdir() if path != out / ".lock" else path.unlink()


# -- the files of a run -----------------------------------------------------------------
def _record_config(cfg: RunConfig, out: Path) -> None:
    """Write ``cfg`` as ``out/config.toml`` unless it holds just that already."""
    recorded = out / "config.toml"
    if not recorded.exists() or recorded.read_text(encoding="utf-8") != to_toml(cfg):
        write_atomic(recorded, to_toml(cfg).encode("utf-8"))


def _load_finished_stage(
    model: nn.Module,
    stage: str,
    out: Path,
    device: torch.device,
    generator: torch.Generator,
    writer: bool = True,
) -> dict[str, Any]:
    """Load the final checkpoint of ``stage`` in ``out`` into ``model``; its figures.
    ``generator`` then draws as if the stage had just run. ``writer``: whether this
    process may tidy the folder (rank 0 under torchrun)."""
    final = out / f"{stage}.pt"
    state = load_checkpoint(final, map_location=device)
    load_model_state(model, state, final)
    result = _stage_result(state, final)
    # a run killed between writing the final checkpoint and removing the
    # in-progress one left the latter behind: it is of no use now
    if writer:
        (out / f"{stage}.last.pt").unlink(missing_ok=True)
    if "rng" in state:  # the next stage draws as if this one had just run
        set_rng(state["rng"], generator)
    return result


def _save_finished_stage(
    model: nn.Module, stage: str, result: dict[str, Any], out: Path, generator: torch.Generator
) -> None:
    """Write the final checkpoint of ``stage`` in ``out``, and remove its in-progress one."""
    save_checkpoint(
        {
            "stage": stage,
            "model": model.state_dict(),
            "result": result,
            "rng": get_rng(generator),
        },
        out / f"{stage}.pt",
    )
    (out / f"{stage}.last.pt").unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json_bytes(obj))
