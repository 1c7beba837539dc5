"""Removing forward hooks by their function rather than by the handle that registered
them: a copy or a pickle of a model holds the same module-level hook functions, not
the handles (bbdrop's gates, the masks beside compacted layers and the routing of
``nn.MultiheadAttention`` are all applied by such functions)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn

__all__ = ["remove_hooks_"]

# the dictionaries PyTorch keeps beside a module's hooks, keyed like them
_BESIDE = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
           "_forward_hooks_always_called")  # fmt: skip


def remove_hooks_(module: nn.Module, functions: Collection[Any]) -> None:
    """Remove, in place, every forward pre-hook and forward hook of ``module`` that is
    one of ``functions``, with its entries in PyTorch's side dictionaries."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in functions]:
            del hooks[key]
            for extra in _BESIDE:
                getattr(module, extra, {}).pop(key, None)
