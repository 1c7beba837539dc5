"""Mixed precision: the network's layers in bfloat16 or float16, the gates in float32.

``precision = "bf16"`` (CPU and GPU) or ``"fp16"`` (GPU) runs each training step's
forward pass under ``torch.autocast``: PyTorch computes the convolutions and matrix
products in the low precision and keeps the weights, the optimiser and the gradients
in float32. A gate does not compute in the low precision: its hook hands it the
activation converted to float32 with autocast off (:func:`full_precision`), so the
methods' sampling (the Kumaraswamy draws in log space, the relaxed Bernoulli's
logits, the hard concrete, the truncated normal's log Z) and the DBB statistics are
those of a float32 run, and the gated activation goes back to the layer's dtype. The
cross-entropy and the KL terms are computed outside autocast, in float32, on the
network's outputs converted back.

float16 has a narrow range: its gradients go through a ``torch.amp.GradScaler``
(:func:`grad_scaler`), whose state the stage's checkpoint keeps. bfloat16 has
float32's range and needs none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

PRECISIONS = ("float32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str) -> None:
    """ValueError for a precision this device cannot train in, naming the one it can."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(
            "precision fp16 needs a CUDA device (float16 autocast with a gradient scaler); "
            "on the CPU use precision bf16, or float32"
        )


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """The forward pass's context: ``torch.autocast`` in ``precision``'s dtype on
    ``device``'s type, nothing for float32."""
    if precision == "float32":
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=_DTYPES[precision]):
        yield


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A gradient scaler for float16, None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def full_precision(
    dtype: torch.dtype, fn: Callable[[Tensor], Tensor], x: Tensor, out: torch.dtype | None = None
) -> Tensor:
    """``fn(x)``, where ``fn`` is a gate's computation and ``dtype`` its parameters'.
    Under autocast, ``fn`` runs with autocast off on ``x`` converted to ``dtype``, and its
    result is converted to ``out`` (default: ``x``'s dtype). Outside autocast it runs as
    it is (a dtype mismatch stays the gate's own clear error)."""
    if not x.is_floating_point() or not _autocast_on(x.device.type):
        return fn(x)
    with torch.autocast(x.device.type, enabled=False):
        return fn(x.to(dtype)).to(out or x.dtype)
