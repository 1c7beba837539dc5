"""What runs beside a compacted layer, attached as gates are (:mod:`bbdrop.attach`).

The layer stays the plain layer, of its type and at its place in the network, so code
that reads ``layer.weight`` keeps working. It carries, as children:

* ``layer.select``, a :class:`SelectFeatures`: the input features it still reads,
  gathered in front of it;
* ``layer.mask``, a :class:`~bbdrop.gates.TestTimeMask`: an input-dependent gate's
  test-time mask on its kept units, on the layer's input (after the gather) or on
  its output.

Module-level hook functions apply them, one per child and side (:func:`_gather` and
:func:`_mask_input` before the layer, in that order; :func:`_mask_output` after it).
Each looks its child up on the layer it runs on, so a copy or a pickle of the network
keeps working, and the hook that applies the mask says which side it is on. PyTorch's
fast paths (``nn.TransformerEncoderLayer`` in eval) check for hooks: they step aside
where something runs beside a layer, and run where nothing does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from bbdrop.compaction.modules import SelectFeatures
from bbdrop.gates.masks import TestTimeMask
from bbdrop.hooks import remove_hooks_

__all__ = [
    "CHILDREN", "Beside", "attach_beside_", "beside", "detach_beside_", "share_mask_",
    "shared_mask",
]  # fmt: skip

Side = Literal["input", "output"]
CHILDREN = ("select", "mask")  # the names of what runs beside a layer, as its children


def _gather(layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the features ``layer`` still reads."""
    return (layer.select(args[0]), *args[1:])


def _mask_input(layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the test-time mask on ``layer``'s input (after the gather)."""
    return (layer.mask(args[0]), *args[1:])


def _mask_output(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Forward hook: the test-time mask on ``layer``'s output."""
    return layer.mask(output)


def _mask_shared(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Forward hook on a further module of a coupled group: the mask that the group's
    first module drew in this pass, on this module's output."""
    return module.__dict__["_bbdrop_mask"].again(output)


_HOOKS = (_gather, _mask_input, _mask_output)


def share_mask_(module: nn.Module, mask: TestTimeMask) -> nn.Module:
    """Apply ``mask`` (beside the first module of a coupled group, on its output) to
    ``module``'s output too, in place, with what the mask drew in the same pass
    (:meth:`TestTimeMask.again`): a further module of the group. ``module`` keeps a
    plain reference, so the mask is saved once, with its own module."""
    if not isinstance(mask, TestTimeMask):
        raise TypeError(f"mask must be a bbdrop.gates.TestTimeMask, got {type(mask).__name__}")
    mask.shared = True
    module.__dict__["_bbdrop_mask"] = mask
    if _mask_shared not in module._forward_hooks.values():
        module.register_forward_hook(_mask_shared)
    return module


def shared_mask(module: nn.Module) -> TestTimeMask | None:
    """The mask of a coupled group's first module that ``module`` applies again, or None."""
    if _mask_shared not in module._forward_hooks.values():
        return None
    return module.__dict__.get("_bbdrop_mask")


@dataclass(frozen=True)
class Beside:
    """What runs beside one compacted layer; either part may be absent."""

    select: SelectFeatures | None = None
    mask: TestTimeMask | None = None
    mask_side: Side = "input"

    def children(self) -> dict[str, nn.Module]:
        """The parts present, by their child name on the layer."""
        parts = {"select": self.select, "mask": self.mask}
        return {name: m for name, m in parts.items() if m is not None}


def beside(layer: nn.Module) -> Beside:
    """What runs beside ``layer`` (nothing, for a plain layer), found by the hooks that
    apply it."""
    hooks = {*layer._forward_pre_hooks.values(), *layer._forward_hooks.values()}
    select = layer._modules.get("select") if _gather in hooks else None
    masked = _mask_input in hooks or _mask_output in hooks
    side: Side = "output" if _mask_output in hooks else "input"
    return Beside(select, layer._modules.get("mask") if masked else None, side)


def attach_beside_(layer: nn.Module, what: Beside) -> nn.Module:
    """Put ``what`` beside ``layer`` in place of what ran there, in place; returns ``layer``."""
    if what.select is not None and not isinstance(what.select, SelectFeatures):
        raise TypeError(f"select must be a SelectFeatures, got {type(what.select).__name__}")
    if what.mask is not None and not isinstance(what.mask, TestTimeMask):
        raise TypeError(f"mask must be a bbdrop.gates.TestTimeMask, got {type(what.mask).__name__}")
    if what.mask_side not in ("input", "output"):
        raise ValueError(f"mask_side must be 'input' or 'output', got {what.mask_side!r}")
    detach_beside_(layer)
    for name in what.children():
        if hasattr(layer, name):
            raise ValueError(
                f"this {type(layer).__name__} has an attribute {name!r} of its own, where "
                f"bbdrop would put its {name}; rename it"
            )
    if what.select is not None:
        layer.select = what.select
        layer.register_forward_pre_hook(_gather)
    if what.mask is not None:
        layer.mask = what.mask
        if what.mask_side == "input":
            layer.register_forward_pre_hook(_mask_input)
        else:
            layer.register_forward_hook(_mask_output)
    return layer


def detach_beside_(layer: nn.Module) -> Beside:
    """Take what runs beside ``layer`` off it, in place, and return it: the plain layer."""
    what = beside(layer)
    remove_hooks_(layer, _HOOKS)
    for name in what.children():
        delattr(layer, name)
    return what
