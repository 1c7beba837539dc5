"""Replacing a submodule of a network by its dotted name."""

from __future__ import annotations

from torch import nn


def set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` (dotted) in ``net``, in place of what is there."""
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)
