"""Checks of numeric arguments: one implementation and one wording for the whole package.

Predicates answer yes or no: :func:`is_number` (a real int or float, not a bool, finite
by default) and :func:`is_whole` (an int, not a bool). Checks return the cleaned value
(a float, or the int) or raise a ValueError that names the argument, the accepted
range and the value, so that callers write ``self.lr = validate.positive("lr", lr)``:

>>> positive("lr", 1)
1.0
>>> whole("jobs", 4, lo=1)
4
>>> probability("droprate_init", 1.0)
Traceback (most recent call last):
ValueError: droprate_init must be a finite number in (0, 1), got 1.0
>>> whole("padding", True, lo=0)
Traceback (most recent call last):
ValueError: padding must be an int >= 0, got True
>>> in_range("threshold", 9, -8.0, 8.0, closed=(False, True))
Traceback (most recent call last):
ValueError: threshold must be a finite number in (-8, 8], got 9
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["in_range", "is_number", "is_whole", "non_negative", "positive", "probability", "whole"]

INF = math.inf


def is_number(value: Any, finite: bool = True, kinds: Any = (int, float)) -> bool:
    """True for an int or float (or an instance of ``kinds``) that is not a bool, and
    finite unless ``finite`` is False (an int too large for a float is not finite).

    >>> [is_number(v) for v in (1, 2.5, True, "1", None, math.nan, math.inf, 10**400)]
    [True, True, False, False, False, False, False, False]
    >>> is_number(math.inf, finite=False)
    True
    """
    if isinstance(value, bool) or not isinstance(value, kinds):
        return False
    try:
        return not finite or math.isfinite(value)
    except OverflowError:
        return False


def is_whole(value: Any) -> bool:
    """True for an int that is not a bool.

    >>> [is_whole(v) for v in (3, -1, True, 3.0, "3")]
    [True, True, False, False, False]
    """
    return isinstance(value, int) and not isinstance(value, bool)


def _show(bound: float) -> str:
    """A bound as short as ``{:g}`` where that keeps it exactly (``8``, ``0.0001``)."""
    short = f"{bound:g}"
    return short if float(short) == bound else repr(bound)


def _range(lo: float, hi: float, left: bool, right: bool) -> str:
    """The accepted range in words: ``>= 0``, ``< 1``, ``in (0, 1]``, or nothing."""
    if lo == -INF and hi == INF:
        return ""
    if hi == INF:
        return f" {'>=' if left else '>'} {_show(lo)}"
    if lo == -INF:
        return f" {'<=' if right else '<'} {_show(hi)}"
    return f" in {'[' if left else '('}{_show(lo)}, {_show(hi)}{']' if right else ')'}"


def in_range(
    name: str,
    value: Any,
    lo: float = -INF,
    hi: float = INF,
    closed: bool | tuple[bool, bool] = True,
) -> float:
    """``value`` as a float: a finite number in [lo, hi] (``closed``), (lo, hi) (not
    ``closed``), or half-open with ``closed=(left, right)``; an infinite bound is no bound.
    ValueError naming ``name``, the range and ``value`` otherwise.

    >>> in_range("init_mu", -20, -20.0, 5.0)
    -20.0
    >>> in_range("gamma", 0.0, hi=0, closed=False)
    Traceback (most recent call last):
    ValueError: gamma must be a finite number < 0, got 0.0
    """
    left, right = (closed, closed) if isinstance(closed, bool) else closed
    inside = is_number(value) and (lo <= value if left else lo < value)
    if not (inside and (value <= hi if right else value < hi)):
        raise ValueError(
            f"{name} must be a finite number{_range(lo, hi, left, right)}, got {value!r}"
        )
    return float(value)


def positive(name: str, value: Any) -> float:
    """``value`` as a float: a finite number > 0 (:func:`in_range`)."""
    return in_range(name, value, lo=0, closed=False)


def non_negative(name: str, value: Any) -> float:
    """``value`` as a float: a finite number >= 0 (:func:`in_range`).

    >>> non_negative("kl_scale", -1)
    Traceback (most recent call last):
    ValueError: kl_scale must be a finite number >= 0, got -1
    """
    return in_range(name, value, lo=0)


def probability(name: str, value: Any) -> float:
    """``value`` as a float: a number in the open interval (0, 1) (:func:`in_range`)."""
    return in_range(name, value, 0, 1, closed=False)


def whole(name: str, value: Any, lo: float = -INF, hi: float = INF) -> int:
    """``value``: an int (not a bool) in [lo, hi]; ValueError naming ``name``, the range
    and ``value`` otherwise.

    >>> whole("num_classes", 1, lo=2)
    Traceback (most recent call last):
    ValueError: num_classes must be an int >= 2, got 1
    >>> whole("seed", 2.0)
    Traceback (most recent call last):
    ValueError: seed must be an int, got 2.0
    """
    if not (is_whole(value) and lo <= value <= hi):
        raise ValueError(f"{name} must be an int{_range(lo, hi, True, True)}, got {value!r}")
    return value


def budget_fractions(owner: object, label: str) -> str | None:
    """Why ``owner.flops`` or ``owner.params`` (a budget: fractions of the dense network's
    FLOPs and parameters, each None or a number in (0, 1]) is wrong, naming it as
    ``label`` + its name; None when both are right."""
    for name, what in (("flops", "FLOPs"), ("params", "parameters")):
        v = getattr(owner, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                              or not 0 < v <= 1):  # fmt: skip
            return (f"{label}{name} is the fraction of the dense network's {what} to end at, "
                    f"a number in (0, 1] (0.125 for 8x fewer), got {v!r}")  # fmt: skip
    return None
