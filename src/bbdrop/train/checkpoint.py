"""Checkpoints that are never half-written, and that are read without running code.

:func:`save_checkpoint` writes through :func:`bbdrop.files.atomic_file`
(temporary file, fsync, rename): a run killed at any moment leaves either the
previous checkpoint or the new one, never a torn file. :func:`load_checkpoint`
reads with ``weights_only=True`` and answers every unreadable file with one
line naming it and the fix.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from bbdrop.files import atomic_file

__all__ = ["CheckpointError", "load_checkpoint", "load_model_state", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours."""


_FORMAT = "bbdrop-checkpoint-1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` (tensors, dicts, lists, numbers, strings) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        try:
            torch.save({"format": _FORMAT, **state}, f)
        except RuntimeError as err:
            # Ctrl-C while torch writes: its zip writer then fails as it closes, and that
            # RuntimeError would hide the interrupt (a traceback instead of the CLI's line)
            if isinstance(err.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (weights only: no code runs).

    Raises :class:`CheckpointError`, one line naming the file and what to do, when
    it is missing, empty, truncated, asks to run code, or was not written by bbdrop.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; delete it to run its stage again")
    fix = f"delete {path} to run its stage again"
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); {fix}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} is corrupt or was not written by bbdrop (a weights-only load refused it: "
            f"{_unpickling_reason(err)}; nothing in it ran); {fix}"
        ) from err
    except Exception as err:
        reason = _first_line(err).split(". ")[0].rstrip(".")  # torch's first sentence
        raise CheckpointError(f"{path} is truncated or corrupt ({reason}); {fix}") from err
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a bbdrop checkpoint; {fix}")
    del state["format"]
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """``model.load_state_dict(state["model"])``; :class:`CheckpointError` naming ``path``
    when the checkpoint holds another network's weights, or weights that are not finite."""
    weights = state.get("model")
    if isinstance(weights, dict):
        for name, value in weights.items():
            if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
                raise CheckpointError(
                    f"{path} holds NaN or inf values ({name}): not the result of a finished "
                    "epoch (those are checked); delete it to run its stage again"
                )
    try:
        model.load_state_dict(_unwrapped(weights, model) if isinstance(weights, dict) else weights)
    except (KeyError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # load_state_dict: "Error(s) in loading state_dict for Net:" then the first problem
        detail = (
            lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else _first_line(err)
        )
        raise CheckpointError(
            f"{path} holds the weights of another network ({detail}); delete it to run "
            "its stage again, or use another output folder"
        ) from err


def _unwrapped(weights: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``weights`` with the keys of a checkpoint written before gates became hooks (0.1:
    a gated layer was wrapped, its weights under ``<layer>.layer.``) renamed to the
    layer's own keys, where ``model`` has them; other keys as they are."""
    own = model.state_dict().keys()

    def key(name: str) -> str:
        head, found, tail = name.rpartition(".layer.")
        return f"{head}.{tail}" if found and name not in own and f"{head}.{tail}" in own else name

    return {key(name): value for name, value in weights.items()}


def _unpickling_reason(err: BaseException) -> str:
    """What torch's weights-only refusal refused (its message is mostly advice to load
    the file unsafely, which is not ours to give)."""
    text = str(err)
    for marker, keep in (("WeightsUnpickler error:", False), ("Trying to load unsupported", True)):
        _, found, tail = text.partition(marker)
        lines = [line.strip() for line in (marker * keep + tail).splitlines() if line.strip()]
        if found and lines:
            return lines[0].split(". ")[0].rstrip(".")
    return "unsupported content"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
