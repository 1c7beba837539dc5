"""Attaching gates to a trained network without wrecking it.

At test time every method multiplies each unit by a value its gate starts at; with
the authors' start settings that value is far from 1 for some methods (BB's
``E_q[pi]`` starts at 0.24, L0's test-time gate at 0.5), which the paper's networks
trained from their dense start absorb, but a trained network does not: behind
batch norms that use running statistics the scale compounds layer after layer
(a ResNet-18-style CIFAR network at 3.9% error went to 83.6% right after attaching
BB with its defaults). This module holds

* :data:`PRETRAINED_SETTINGS`: per method, the start settings under which the
  gates begin near 1 with little training noise, so that the network's error right
  after attaching stays within :data:`TOLERANCE` points of its own;
* :func:`eval_error`: a network's error on a batch, free of side effects;
* :func:`check_attach`: the warning to give when attaching raised that error.

``benchmarks/attach_safety.py`` measures all of this on a ResNet and on LeNet5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bbdrop import validate

__all__ = [
    "PRETRAINED_SETTINGS",
    "TOLERANCE",
    "AttachWarning",
    "check_attach",
    "eval_error",
    "pretrained_settings",
]

TOLERANCE = 0.5
"""How many points (of percent error) attaching may add before :func:`check_attach` warns."""

PRETRAINED_SETTINGS: dict[str, dict[str, float]] = {
    # E_q[pi] = 1 - 1.9 init_b near b = 0 (init_a left at the authors' 0.313): 0.9906, and
    # training drops 1% of the units per example, where the authors' b = 1 gives
    # E_q[pi] = 0.24 and drops 76% (the pretrained ResNet went to 90% error, chance, and
    # stayed there through the first epoch; LeNet5 +45 points). The KL still pulls b up
    # (its gradient grows as 1/b^2): b_raw has 5.8 to climb to b = 1, some 600 Adam steps
    # at the gates' lr 1e-2, while init_a = 9 (E = 0.9, +32 points on the ResNet) or 99
    # would be far slower to undo. benchmarks/attach_safety.py: ResNet -0.40, LeNet5
    # +0.00 (both placements) right after attaching.
    "bb": {"init_b": 0.005},
    # BB's start for the gates it is converted from, and beta_hat = 3: the running mean
    # and variance start at 0 and 1, so right after converting phi = clamp(h + beta_hat)
    # on raw, unstandardised inputs h; the authors' beta_hat = 1 cuts the ResNet's units
    # where h < 0 (+23 points, with BB's gates at 0.99) and, once the statistics are
    # learned, drops a third of the activations in training (E[1 - phi], standardised h)
    # where beta_hat = 3 drops 1%. ResNet right after: -0.40 (beta_hat 2 and 3 alike);
    # after the short epoch 12.8% (beta_hat 2: 17.0%; 1 with gamma 0.1: 40%; dense 12.45%).
    # The KL pulls beta_hat towards 0, so the input dependence grows as it trains.
    "dbb": {"init_b": 0.005, "init_shift": 3.0},
    # The default (the authors'): prunes at the start only weights with
    # |w| <= exp((-10 - 3) / 2) = 0.0015; +0.00 on both networks. A lower value would put
    # the log alpha of larger weights below its clip at -8, where it gets no gradient.
    "svd": {"init_log_sigma2": -10.0},
    # Nothing to set: an SSL gate is exactly 1 on every unit whose weights are not all zero.
    "ssl": {},
    # The default (the authors'): E[theta] = 0.9946 per unit, training noise std 0.004;
    # +0.00 on both networks (init_log_sigma = -7 gives 0.9993, also +0.00 to +0.05).
    "sbp": {"init_log_sigma": -5.0},
    # log_alpha = log(99) = 4.6: the test-time gate is exactly 1 (it is for any
    # droprate_init below 1/12) and in training P(z = 1) = 0.95, P(z = 0) = 0.002; the
    # authors' 0.5 starts the test-time gate at 0.5 (ResNet +78 points, LeNet5 +1.2) and
    # P(z = 1) at 0.17. First-epoch error on the ResNet: 13.95% (0.02: 16.8%, 0.05:
    # 18.45%; dense 12.45%); on LeNet5 it still prunes 12.8% of the units in one epoch.
    "l0": {"droprate_init": 0.01},
    # mu starts at exactly 1 rather than 1 + N(0, 0.01^2) per unit: the authors' jitter
    # breaks the symmetry of an untrained network, which a trained one does not have;
    # +0.10 and +0.20 points with it, +0.00 without. The training noise is the default's
    # (sigma = exp(-9 / 2) = 0.011).
    "vib": {"init_std": 0.0},
}


class AttachWarning(UserWarning):
    """Attaching gates raised a network's error by more than :data:`TOLERANCE` points."""


def pretrained_settings(method: str, **given: Any) -> dict[str, Any]:
    """The constructor settings of ``method`` for a trained network: those of
    :data:`PRETRAINED_SETTINGS`, overridden by ``given``. A method with no entry (one
    registered by a user) gets ``given`` alone."""
    return {**PRETRAINED_SETTINGS.get(method, {}), **given}


@torch.no_grad()
def eval_error(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """The error of ``model`` on ``(x, y)``, in percent: the share of the examples whose
    largest output is not their label, times 100.

    Runs in eval mode without gradients, ``batch_size`` examples at a time, and leaves
    the model's modes and buffers (batch-norm statistics, DBB's counters) as they
    were (:func:`bbdrop.attach.side_effect_free`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("x and y must be tensors")
    if x.dim() < 1 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(
            f"x and y must hold the same number (>= 1) of examples, y one label each; got "
            f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}"
        )
    validate.whole("batch_size", batch_size, lo=1)
    from bbdrop.attach import side_effect_free  # here: bbdrop.attach may import this module

    wrong = 0
    with side_effect_free(model):
        for i in range(0, len(y), batch_size):
            out = model(x[i : i + batch_size])
            wrong += int((out.argmax(dim=-1) != y[i : i + batch_size].to(out.device)).sum())
    return 100.0 * wrong / len(y)


def check_attach(
    before_error: float,
    after_error: float,
    method: str,
    *,
    attached_with: Mapping[str, Any] | None = None,
    tolerance: float = TOLERANCE,
) -> str | None:
    """The warning text when attaching ``method``'s gates raised the error (in percent,
    :func:`eval_error`, on the same examples) by more than ``tolerance`` points, else None.

    The text names both errors and the settings to start the gates with: those of
    :data:`PRETRAINED_SETTINGS`, or, when ``attached_with`` (the settings the gates were
    built with) holds them already, which way to turn them further.
    """
    for name, value in (("before_error", before_error), ("after_error", after_error)):
        if not validate.is_number(value) or not 0 <= value <= 100:
            raise ValueError(f"{name} must be an error in percent, in [0, 100], got {value!r}")
    if not validate.is_number(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a number of points >= 0, got {tolerance!r}")
    # rounded: errors are multiples of 100 / n, and 4.4 - 3.9 is 0.5000000000000004
    if not round(after_error - before_error, 9) > tolerance:
        return None
    head = (
        f"attaching {method!r} gates raised the eval error on the check batch from "
        f"{before_error:.2f}% to {after_error:.2f}%"
    )
    if method not in PRETRAINED_SETTINGS:
        return (
            f"{head}; start the gates near 1 (the value each unit is multiplied by at test "
            "time) through the method's init settings"
        )
    settings = PRETRAINED_SETTINGS[method]
    if not settings:
        return (
            f"{head}; {method!r} gates start at exactly 1 on every unit whose weights are "
            "not all zero, so no start setting changes this: check the network (its mode, "
            "its batch norms' statistics) and the check batch"
        )
    listed = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    where = f"bbdrop.safety.PRETRAINED_SETTINGS[{method!r}]"
    if attached_with is None or not _holds(method, attached_with, settings):
        return f"{head}; start them near 1 with {listed} ({where})"
    return f"{head}, even with {listed} ({where}); start them nearer 1: {_FURTHER[method]}"


def _holds(method: str, given: Mapping[str, Any], settings: Mapping[str, float]) -> bool:
    """Whether gates built with ``given`` (the rest at the method's defaults) start with
    ``settings``."""
    from bbdrop.gates import settings_type

    try:
        built = settings_type(method)(**given).kwargs()
    except (TypeError, ValueError):  # not the method's settings: compare what was given
        built = dict(given)
    return all(k in built and built[k] == v for k, v in settings.items())


# Which way to turn each method's start settings when PRETRAINED_SETTINGS is not enough.
_FURTHER = {
    "bb": "a smaller init_b (E_q[pi] starts near 1 - 1.9 init_b at the default init_a)",
    "dbb": (
        "a smaller init_b (of the BB gates it is converted from) and a larger init_shift "
        "or smaller init_scale (phi starts at init_scale * h + init_shift, clamped to 1)"
    ),
    "svd": (
        "a lower init_log_sigma2 (weights smaller than exp((init_log_sigma2 - threshold) / 2) "
        "start pruned)"
    ),
    "sbp": "a lower init_log_sigma (E[theta] starts near 1 - 0.8 exp(init_log_sigma))",
    "l0": "a smaller droprate_init (the test-time gate starts at exactly 1 below about 0.083)",
    "vib": "init_std=0.0 and a lower init_logvar",
}
