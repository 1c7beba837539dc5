"""Test-time masks: the plain module an input-dependent gate leaves in a compacted network,
and their registry.

An input-dependent gate (:attr:`Gate.input_dependent`) cannot fold its values into
the weights: at test time it still multiplies each unit of its input by a value
computed from that input, zero for the units it switches off for that example.
:meth:`Gate.to_module` returns that computation, on the units the compacted
network kept, as a :class:`TestTimeMask`: tensors as buffers, nothing to sample.

A subclass is registered by its class name when it is defined, and declares what a
compact file (:mod:`bbdrop.compact_file`) needs to hold it: its non-tensor settings
(:meth:`TestTimeMask.settings`), the values each of them accepts
(:attr:`TestTimeMask.fields`, plain data that the file's reader turns into its
checks), and an empty mask of the right shapes built from the settings alone
(:meth:`TestTimeMask.empty`), into which the stored tensors are loaded.
:func:`bbdrop.runtime_pruned` skips, in the layer after any registered mask, the
units the mask switched off.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

__all__ = ["TestTimeMask", "from_units_second", "get_mask_class", "list_masks", "units_second"]

CANONICAL = (0, 1)  # batch first, units second: (N, K, ...)


def units_second(x: Tensor, layout: tuple[int, int], size: int = 1) -> Tensor:
    """A view of ``x`` with its batch first and its units second, (N, K, ...), from
    ``layout`` = (batch dimension, unit dimension): how gates and masks see a layer's
    input or output (a ``Linear`` keeps its features last, (N, ..., K)). ``size`` > 1:
    a unit is that many consecutive features of the last dimension (an attention
    head's), which becomes a position of the unit, (N, K, ..., size)."""
    if size > 1:
        x, layout = x.unflatten(-1, (-1, size)), (layout[0], -2)
    if x.dim() == 2 or tuple(layout) == CANONICAL:
        return x
    return x.movedim(tuple(layout), CANONICAL)


def from_units_second(y: Tensor, layout: tuple[int, int], size: int = 1) -> Tensor:
    """The inverse of :func:`units_second`: ``y`` (N, K, ...) back in ``layout``."""
    if size > 1:
        return from_units_second(y, (layout[0], -2)).flatten(-2)
    if y.dim() == 2 or tuple(layout) == CANONICAL:
        return y
    return y.movedim(CANONICAL, tuple(layout))


def apply_units(x: Tensor, m: Tensor) -> Tensor:
    """``x`` (N, K, ...) times mask ``m`` of shape (K,) or (N, K), shared over the
    positions (the dimensions after K)."""
    if x.dim() > 2:  # one value per channel or feature, at every position
        m = m.reshape(*m.shape, *[1] * (x.dim() - 2))
    return x * m


# What a field of a mask's settings accepts, as plain data:
#   "width"                       an integer in [1, the largest width a file may give]
#   "flag"                        true or false
#   ("integer", lo, hi)           an integer in [lo, hi]
#   ("number", lo, hi, "open")    a finite number in (lo, hi); "closed": in [lo, hi]
Field = str | tuple[Any, ...]

_MASKS: dict[str, type[TestTimeMask]] = {}


def get_mask_class(name: str) -> type[TestTimeMask]:
    """The :class:`TestTimeMask` subclass registered as ``name`` (its class name);
    ValueError listing the names otherwise."""
    if name not in _MASKS:
        raise ValueError(f"unknown test-time mask {name!r}; available: {', '.join(list_masks())}")
    return _MASKS[name]


def list_masks() -> list[str]:
    """Names of the registered test-time masks, sorted."""
    return sorted(_MASKS)


def _check_field(cls: type, key: str, field: Field) -> None:
    """TypeError unless ``field`` is one of the forms of :data:`Field`."""
    if field in ("width", "flag"):
        return
    ok = isinstance(field, tuple) and (
        (len(field) == 3 and field[0] == "integer")
        or (len(field) == 4 and field[0] == "number" and field[3] in ("open", "closed"))
    )
    if not ok:
        raise TypeError(
            f"{cls.__name__}.fields[{key!r}] must be 'width', 'flag', ('integer', lo, hi) "
            f"or ('number', lo, hi, 'open' or 'closed'), got {field!r}"
        )


class TestTimeMask(nn.Module, ABC):
    """``x`` times an input-dependent mask over its units (the features of (N, K), the
    channels of (N, K, H, W), the mask shared over positions; ``layout`` says where the
    batch and the units are when they are elsewhere, as for a ``Linear`` on (N, T, K)),
    zero for the units switched off for an example; what :meth:`Gate.to_module` returns.

    Subclasses implement :meth:`mask`, :meth:`settings` and :meth:`empty` and set
    :attr:`fields`; defining one registers it under its class name (the ``type`` a
    compact file gives it), which must be unique.
    """

    __test__ = False  # not a pytest test class, whatever its name says
    # The settings (keys of :meth:`settings`) and the values each accepts (see Field).
    fields: ClassVar[dict[str, Field]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        known = _MASKS.get(cls.__name__)
        same = known is not None and (known.__module__, known.__qualname__) == (
            cls.__module__, cls.__qualname__)  # fmt: skip
        if known is not None and not same:  # the same class defined again replaces itself
            raise TypeError(
                f"a test-time mask named {cls.__name__!r} is already registered "
                f"({known.__module__}.{known.__qualname__}); give the class another name"
            )
        for key, field in cls.fields.items():
            _check_field(cls, key, field)
        _MASKS[cls.__name__] = cls

    # (batch dimension, unit dimension) of the tensors the mask multiplies; plain data,
    # not a setting of the method (a compact file holds masks on (N, K, ...) only).
    layout: tuple[int, int] = CANONICAL
    # features per unit, consecutive on the last dimension (an attention head's), or 1
    unit_size: int = 1
    # True for the mask of a coupled group's gate (several modules write the channels):
    # forward keeps what it drew (``drawn``) for the others (:meth:`again`).
    shared: bool = False
    drawn: Tensor | None = None

    @abstractmethod
    def mask(self, x: Tensor) -> Tensor:
        """(N, K): the mask of each example of ``x`` (N, K, ...)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The non-tensor settings (JSON values), one per key of :attr:`fields`: with
        them :meth:`empty` builds a mask whose buffers have this one's shapes."""

    @classmethod
    @abstractmethod
    def empty(cls, settings: dict[str, Any]) -> TestTimeMask:
        """A mask with ``settings`` (checked against :attr:`fields`) and buffers of the
        shapes they imply, of any value: a compact file's tensors are loaded into it."""

    def forward(self, x: Tensor) -> Tensor:
        x = units_second(x, self.layout, self.unit_size)
        m = self.mask(x)
        if self.shared:  # the further modules of a coupled group apply it too
            self.drawn = m
        return from_units_second(apply_units(x, m), self.layout, self.unit_size)

    def again(self, x: Tensor) -> Tensor:
        """``x`` times the mask this module drew last, in this forward pass (at the first
        module of a coupled group): what the group's further modules apply."""
        if self.drawn is None:
            raise RuntimeError(
                f"this {type(self).__name__} is shared by a group's modules and has drawn no "
                "mask in this pass: its own module must run first"
            )
        x = units_second(x, self.layout, self.unit_size)
        return from_units_second(apply_units(x, self.drawn), self.layout, self.unit_size)
