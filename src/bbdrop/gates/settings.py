"""Each method's settings, typed: a frozen dataclass registered with its gate.

A method declares its constructor's keyword arguments (all but ``num_units``) as
a subclass of :class:`GateSettings`: their types and defaults as fields, their
ranges in :meth:`GateSettings.check`, worded by :mod:`bbdrop.validate`. The gate's
constructor checks its arguments by building its settings, and a configuration's
``[gate]`` table is checked against the chosen method's settings when it is read
(:meth:`bbdrop.config.GateConfig.method_kwargs`), so that ``gate.threshold = 3``
is SVD's log alpha for SVD and an error for BB, before anything runs.

>>> from bbdrop.gates import settings_type
>>> settings_type("svd")(threshold=3)
SparseVDSettings(kl_scale=1.0, threshold=3.0, init_log_sigma2=-10.0, train_clip=True)
>>> settings_type("bb")(threshold=3)
Traceback (most recent call last):
ValueError: threshold must be a finite number in (0, 1), got 3
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Any

from bbdrop import validate

__all__ = ["GateSettings", "settings_from_signature"]


@dataclass(frozen=True, kw_only=True)
class GateSettings:
    """The settings every method has; a method's own subclass adds its fields (with the
    defaults of its gate's constructor) and extends :meth:`check` with their ranges.

    Building one checks each field's type against its annotation (a number for a
    float, stored as a float; an int for an int; true or false for a bool), then
    the ranges: ValueError naming the setting, its range and the value.
    """

    kl_scale: float = 1.0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hints[f.name] is bool and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
        self.check()
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(f.name, hints[f.name], getattr(self, f.name)))

    def check(self) -> None:
        """ValueError for a setting outside its range (subclasses call super().check())."""
        validate.non_negative("kl_scale", self.kl_scale)

    def kwargs(self) -> dict[str, Any]:
        """The settings as the gate constructor's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _typed(name: str, tp: Any, value: Any) -> Any:
    """``value`` as a setting of type ``tp``: a float for a number (an int given for a
    float too), an int for an int; ValueError for a value of another type (where the
    method's :meth:`~GateSettings.check` did not already refuse it)."""
    if tp is int:
        return validate.whole(name, value)
    if tp is float:
        if not validate.is_number(value, finite=False):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    return value


@functools.cache
def settings_from_signature(gate_cls: type) -> type[GateSettings]:
    """Settings for a method that declares none (a gate written before settings were
    typed, or in a notebook): its constructor's keyword arguments beyond ``num_units``,
    a bool default makes a true-or-false field, the others take any value: the
    constructor itself checks them."""
    params = [p for name, p in inspect.signature(gate_cls).parameters.items()
              if name != "num_units" and p.kind is p.POSITIONAL_OR_KEYWORD]  # fmt: skip
    own = [p for p in params if p.name not in {f.name for f in dataclasses.fields(GateSettings)}]
    if not own:
        return GateSettings
    fields = []
    for p in own:
        tp = bool if isinstance(p.default, bool) else Any
        default = p.default if p.default is not p.empty else dataclasses.MISSING
        fields.append((p.name, tp, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{gate_cls.__name__}Settings", fields, bases=(GateSettings,),
                                      frozen=True, kw_only=True)  # fmt: skip
