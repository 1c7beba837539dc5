"""Whether a training stage has diverged, and the error that says so: after each
epoch, :func:`bbdrop.train.loop.train_stage` stops with :class:`DivergenceError`
when the epoch's loss or a parameter is not finite, or its cross-entropy is far
above a uniform guess's, before anything of that epoch is kept.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from bbdrop.attach import side_effect_free
from bbdrop.config import OptimConfig

__all__ = ["DIVERGED_CE_FACTOR", "DivergenceError"]


class DivergenceError(RuntimeError):
    """A stage's loss or weights stopped being finite; nothing of that epoch was kept."""


# An epoch whose mean cross-entropy is this many times a uniform guess's (log K nats)
# has diverged: an initialised or pretrained network starts near or below 1x.
DIVERGED_CE_FACTOR = 100.0


def _check_diverged(
    model: nn.Module,
    stage: str,
    epoch: int,
    averages: tuple[float, float],
    x_eval: Tensor,
    optim: OptimConfig,
    checkpoint: str | Path | None,
) -> None:
    """DivergenceError when the epoch's average loss or any parameter is not finite (a
    NaN or inf anywhere in the epoch makes the average so), or when its average
    cross-entropy is over :data:`DIVERGED_CE_FACTOR` times a uniform guess's."""
    loss, ce = averages
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if not math.isfinite(loss) or bad:
        what = f"the training loss is {loss:g}"
        if bad:
            what += f" and {len(bad)} parameter tensors hold NaN or inf (first: {bad[0]})"
    else:
        with side_effect_free(model):
            num_classes = model(x_eval[:1]).shape[-1]
        uniform = math.log(max(2, num_classes))
        if ce <= DIVERGED_CE_FACTOR * uniform:
            return
        what = (
            f"the mean cross-entropy is {ce:.3g} nats, over {DIVERGED_CE_FACTOR:g} times "
            f"a uniform guess's {uniform:.2f}"
        )
    kept = (
        f"the checkpoint of epoch {epoch - 1} is kept in {checkpoint}"
        if checkpoint is not None and epoch > 1
        else "nothing of this stage was kept"
    )
    raise DivergenceError(
        f"stage {stage!r} diverged in epoch {epoch}: {what}. Likely cause: learning rates "
        f"too high (optim.lr={optim.lr:g}, optim.gate_lr={optim.gate_lr:g}), or NaN/inf in "
        f"the training data; {kept}. Lower the rates and run again in a new output folder"
    )
