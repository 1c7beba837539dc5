"""The checks of a compact file's fields, and the wording of their errors: what
:mod:`bbdrop.compact_file` reads and :mod:`bbdrop.export` writes agree on here.

A check takes a field's value (parsed JSON, so possibly anything a hostile file
holds) and the field's dotted name, and returns the value, cleaned, or raises a
:class:`_FileError` that shows the value, cut short, and what is accepted. The
limits (:data:`MAX_WIDTH`, :data:`MAX_KERNEL`) bound every width and kernel a
description may give, so that no check lets through a layer too large to build.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable
from typing import Any

import torch

from bbdrop import validate
from bbdrop.gates.masks import Field, get_mask_class, list_masks

# The largest width (units, features, channels, classes) a description may give, and the
# largest kernel size, stride, dilation or padding of a convolution.
MAX_WIDTH = 10**7
MAX_KERNEL = 1024


class _FileError(ValueError):
    """What is wrong with a compact file's bytes, worded without the file's name:
    :func:`load_compact` and :func:`bbdrop.export.compact_bytes` put it in their own sentences.

    ``kind``: "unreadable" (not safetensors, cut short), "foreign" (another format),
    "field" (a field of the description) or "fit" (the described network does not
    fit the stored tensors); ``field``: the field at fault, dotted, if one is."""

    def __init__(self, problem: str, field: str | None = None, kind: str = "field") -> None:
        super().__init__(problem)
        self.problem, self.field, self.kind = problem, field, kind

    def what(self) -> str:
        """The field and the problem."""
        return f"field {self.field!r} {self.problem}" if self.field else self.problem

    def sentence(self, where: str) -> str:
        """The problem of the file ``where``, in one line."""
        return {
            "unreadable": f"{where} is not a readable bbdrop compact file: {self.what()}",
            "foreign": f"{where} {self.what()}",
            "fit": f"{where}: {self.what()}: the file does not fit the network it is loaded into",
        }.get(self.kind, f"{where}: {self.what()}")


# -- checking the fields of a description ---------------------------------------------
# A check takes a value and its field (dotted) and returns the value, cleaned, or raises
# a field error that shows the value and what is accepted.
Check = Callable[[Any, str], Any]


def _bad(field: str, want: str, got: object) -> _FileError:
    return _FileError(f"must be {want}, got {_show(got)}", field)


def _object(value: object, field: str, want: str = "an object") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(field, want, value)
    return value


def _field(d: dict[str, Any], key: str, parent: str) -> Any:
    """``d[key]``; a field error naming ``parent.key`` where it is missing."""
    if key not in d:
        raise _FileError("is missing", f"{parent}.{key}" if parent else key)
    return d[key]


def _integer(lo: int, hi: int) -> Check:
    def check(value: Any, field: str) -> int:
        if not validate.is_whole(value) or not lo <= value <= hi:
            raise _bad(field, f"an integer in [{lo}, {_bound(hi)}]", value)
        return value

    return check


def _number(lo: float, hi: float = math.inf, closed: bool = False) -> Check:
    """A finite number in (lo, hi), or [lo, hi] where ``closed``."""
    if hi == math.inf:
        want = f">= {lo:g}" if closed else f"> {lo:g}"
    else:
        want = f"in [{lo:g}, {hi:g}]" if closed else f"in ({lo:g}, {hi:g})"

    def check(value: Any, field: str) -> float:
        number = float(value) if validate.is_number(value) else math.nan
        if not (lo <= number <= hi if closed else lo < number < hi):
            raise _bad(field, f"a finite number {want}", value)
        return number

    return check


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(field, "true or false", value)
    return value


def _one_of(*options: str) -> Check:
    def check(value: Any, field: str) -> str:
        if not isinstance(value, str) or value not in options:
            raise _bad(field, f"one of {sorted(options)}", value)
        return value

    return check


def _pair(lo: int, hi: int) -> Check:
    def check(value: Any, field: str) -> tuple[int, int]:
        if not (isinstance(value, list) and len(value) == 2
                and all(validate.is_whole(v) and lo <= v <= hi for v in value)):  # fmt: skip
            raise _bad(field, f"2 integers in [{lo}, {_bound(hi)}]", value)
        return tuple(value)

    return check


def _padding(value: Any, field: str) -> str | tuple[int, int]:
    if value in ("same", "valid"):
        return value
    try:
        return _pair(0, MAX_KERNEL)(value, field)
    except _FileError:
        raise _bad(field, f"'same', 'valid' or 2 integers in [0, {MAX_KERNEL}]", value) from None


def _optional(check: Check) -> Check:
    def maybe(value: Any, field: str) -> Any:
        return None if value is None else check(value, field)

    return maybe


_WIDTH = _integer(1, MAX_WIDTH)
_NORM: dict[str, Check] = {
    "num_features": _WIDTH, "eps": _number(0),
    "momentum": _optional(_number(0, 1, closed=True)), "affine": _flag,
    "track_running_stats": _flag,
}  # fmt: skip
# The layers a description gives, by type; each may have a "mask", the first two a "select".
_SCHEMAS: dict[str, dict[str, Check]] = {
    "Linear": {"in": _WIDTH, "out": _WIDTH, "bias": _flag},
    "Conv2d": {"in": _WIDTH, "out": _WIDTH, "kernel_size": _pair(1, MAX_KERNEL),
               "stride": _pair(1, MAX_KERNEL), "padding": _padding,
               "dilation": _pair(1, MAX_KERNEL), "groups": _WIDTH, "bias": _flag,
               "padding_mode": _one_of("zeros", "reflect", "replicate", "circular")},
    "BatchNorm1d": _NORM,
    "BatchNorm2d": _NORM,
}  # fmt: skip
GATHERED = ("Linear", "Conv2d")  # the layer types that may read through a gather
# A layer's gather (SelectFeatures), and the side of its mask.
_SELECT: dict[str, Check] = {"size": _WIDTH, "num_features": _WIDTH}
_SIDE = _one_of("input", "output")
# The keys of a mask's description that are not its settings.
MASK_KEYS = ("type", "side")


def _mask_schemas() -> dict[str, dict[str, Check]]:
    """By class name, the checks of the registered test-time masks' settings
    (:class:`bbdrop.gates.TestTimeMask`: DBB's ``DependentMask`` and any other), whose
    fields, plain data, become checks here (:func:`_field_check`)."""
    return {name: {key: _field_check(f) for key, f in get_mask_class(name).fields.items()}
            for name in list_masks()}  # fmt: skip


def _values(spec: dict[str, Any], field: str, schema: dict[str, Check]) -> dict[str, Any]:
    """The fields of ``spec`` that ``schema`` names, each checked (and cleaned)."""
    return {key: check(_field(spec, key, field), f"{field}.{key}") for key, check in schema.items()}


def _check_gather(layer: dict[str, Any], select: dict[str, Any], field: str) -> None:
    """A field error unless the gather ``select`` (checked, at ``field``) keeps as many
    features as its checked ``layer`` reads."""
    if select["size"] != layer["in"]:
        raise _bad(f"{field}.size", f"{layer['in']}, the features its {layer['type']} reads",
                   select["size"])  # fmt: skip


def _field_check(field: Field) -> Check:
    """The check of one field of a test-time mask (:data:`bbdrop.gates.masks.Field`)."""
    if field == "width":
        return _WIDTH
    if field == "flag":
        return _flag
    if field[0] == "integer":
        return _integer(field[1], field[2])
    return _number(field[1], field[2], closed=field[3] == "closed")


# -- wording --------------------------------------------------------------------------
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 4, 60, 60


def _show(value: object) -> str:
    """``repr(value)``, cut short (a hostile value may be long or deeply nested)."""
    return _REPR.repr(value)


def _bound(n: int) -> str:
    """``n`` as written in messages: 10**7 rather than 10000000."""
    k = round(math.log10(n)) if n > 0 else 0
    return f"10**{k}" if n >= 10**4 and n == 10**k else str(n)


def _shape(shape: tuple[int, ...] | torch.Size) -> str:
    return str(tuple(shape))


def _names(names: list[str]) -> str:
    """The first few of ``names``, quoted, and how many more."""
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, without terminal colours, cut to
    300 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    line = next((s.strip() for s in text.splitlines() if s.strip()), "no detail")
    return line if len(line) <= 300 else line[:297] + "..."
