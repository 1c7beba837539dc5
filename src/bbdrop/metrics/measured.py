"""Measured costs, to report beside the paper's accounting (docs/method.md section 5).

:func:`count_parameters` counts stored parameters; :func:`measured_flops` runs
one forward pass under ``torch.utils.flop_counter.FlopCounterMode``, which
counts the FLOPs of matrix multiplications and convolutions only (``2 m n k``
for a product, bias additions, activations, pooling, batch norm and gates
excluded): a different convention from the paper's, which counts those too.
:func:`latencies` times forward passes of several networks against each other.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bbdrop.gates.base import Gate
from bbdrop.metrics.trace import side_effect_free

__all__ = ["Measured", "count_parameters", "latencies", "measure", "measured_flops"]


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


@torch.no_grad()
def latencies(
    models: Mapping[str, nn.Module], x: Tensor | Sequence[Tensor], rounds: int = 7,
    calls: int = 0, warmup: int = 3,
) -> dict[str, float]:  # fmt: skip
    """Seconds per forward pass of each of ``models`` on ``x`` (a batch, or several
    batches taken in turn, e.g. single examples whose run-time masks differ),
    measured against each other: rounds are interleaved (each round times every
    model in turn, so a change of machine load hits all alike) and the figure is the
    median over rounds of each round's mean over ``calls`` passes through all of
    ``x`` (``0``: as many as fill about 20 ms, found from the first model). Eval
    mode; modes are not restored, so pass networks meant for inference."""
    xs = [x] if isinstance(x, Tensor) else list(x)
    sync = torch.cuda.synchronize if xs[0].is_cuda else (lambda: None)

    def passes(m: nn.Module, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            for batch in xs:
                m(batch)
        sync()
        return (time.perf_counter() - t0) / (n * len(xs))

    for m in models.values():
        m.eval()
        passes(m, warmup)
    if calls <= 0:
        once = passes(next(iter(models.values())), 1) * len(xs)
        calls = max(1, min(1000, round(0.02 / max(once, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(passes(m, calls))
    return {name: statistics.median(t) for name, t in times.items()}
