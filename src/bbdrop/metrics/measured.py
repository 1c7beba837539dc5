"""Measured costs, to report beside the paper's accounting (docs/method.md section 5).

:func:`count_parameters` counts stored parameters; :func:`measured_flops` runs
one forward pass under ``torch.utils.flop_counter.FlopCounterMode``, which
counts the FLOPs of matrix multiplications and convolutions only (``2 m n k``
for a product, bias additions, activations, pooling, batch norm and gates
excluded): a different convention from the paper's, which counts those too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bbdrop.gates.base import Gate
from bbdrop.metrics.trace import side_effect_free

__all__ = ["Measured", "count_parameters", "measure", "measured_flops"]


def count_parameters(model: nn.Module, *, include_gates: bool = True) -> int:
    """Number of parameter values of ``model``; ``include_gates=False`` skips the gates'."""
    skip = set()
    if not include_gates:
        skip = {id(p) for m in model.modules() if isinstance(m, Gate) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def measured_flops(model: nn.Module, example_input: Tensor) -> int:
    """Matmul and convolution FLOPs of one forward pass on ``example_input`` (whole batch).

    The model runs in eval mode without gradients; its modes and buffers (batch-norm
    statistics, DBB active-unit counters) are restored afterwards.
    """
    counter = FlopCounterMode(display=False)
    with side_effect_free(model), counter:
        model(example_input)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Measured:
    """Measured size and work: parameter values, and matmul/conv FLOPs of one pass."""

    parameters: int
    flops: int


def measure(model: nn.Module, example_input: Tensor, *, include_gates: bool = True) -> Measured:
    """:func:`count_parameters` and :func:`measured_flops` together."""
    return Measured(
        parameters=count_parameters(model, include_gates=include_gates),
        flops=measured_flops(model, example_input),
    )
