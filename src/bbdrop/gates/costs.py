"""A gate's own test-time cost in the paper's accounting: DBB's formulas.

Lee et al., Sec. 4.2 and Fig. 1 (docs/method.md section 5): a DBB gate costs
``5 K`` FLOPs on K dense units (mask construction and multiplication), ``2 H W K
+ 4 K`` on K channels of H x W (global average pooling, mask, multiply), and
``4 K`` values of memory. :meth:`DependentBetaBernoulliGate.runtime_cost
<bbdrop.gates.dbb.DependentBetaBernoulliGate.runtime_cost>` reports them, and
:mod:`bbdrop.metrics.paper` counts them, through any gate's ``runtime_cost``
(of type :data:`CostFn`), beside the layers' own costs (:mod:`bbdrop.metrics.formulas`,
which shares :func:`check_count` and :func:`check_pair`, the checks of a formula's
arguments).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

from bbdrop import validate

__all__ = [
    "CostFn",
    "Pair",
    "check_count",
    "check_pair",
    "dbb_conv2d_flops",
    "dbb_linear_flops",
    "dbb_memory",
]

Pair = int | tuple[int, int]  # a size or kernel size: one int for both, or (H, W)
# A gate's own test-time cost: (kept units, (H, W) of a conv output or None) -> (FLOPs, memory).
CostFn = Callable[[float, tuple[int, int] | None], tuple[float, float]]


def check_count(name: str, value: float) -> float:
    """``value`` as a float: a finite real number >= 0, not a bool; ValueError naming
    ``name`` otherwise."""
    if not (validate.is_number(value, kinds=numbers.Real) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_pair(name: str, value: Pair) -> tuple[int, int]:
    """``(h, w)`` from an int >= 0 (both) or a pair of them; ValueError naming ``name``
    otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(validate.is_whole(v) and v >= 0 for v in pair):
        raise ValueError(f"{name} must be an int >= 0 or a pair of them, got {value!r}")
    return pair[0], pair[1]


def dbb_linear_flops(num_gates: float) -> float:
    """``5 K``: a DBB gate on K dense units (mask construction and multiplication)."""
    return 5.0 * check_count("num_gates", num_gates)


def dbb_conv2d_flops(num_gates: float, size: Pair) -> float:
    """``2 H W K + 4 K``: a DBB gate on K channels of H x W (pooling, mask, multiply)."""
    h, w = check_pair("size", size)
    k = check_count("num_gates", num_gates)
    return 2.0 * h * w * k + 4.0 * k


def dbb_memory(num_gates: float) -> float:
    """Four values per DBB gate unit."""
    return 4.0 * check_count("num_gates", num_gates)
