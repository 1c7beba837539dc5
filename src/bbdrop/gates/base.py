"""The gate protocol that every sparsification method implements, and its registry.

A gate multiplies unit k of its input (dimension 1: the features of a dense
activation (N, K), the channels of a convolutional one (N, K, H, W)) by a
learned value. The trainer, the metrics and the compactor talk to gates only
through this class:

* ``forward(x)``: the gated activations (stochastic in training mode);
* ``kl()``: the gate's regularisation term, a scalar (a KL divergence for the
  Bayesian methods); the objective adds ``kl_scale * kl() / N``;
* ``gate_values()``: the deterministic, input-independent test-time value of
  each unit, exactly zero for a pruned unit;
* ``keep_mask()`` / ``num_kept()``: which units survive, and how many.

A new method is one subclass in its own file plus ``@register_gate("name")``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["Gate", "create_gate", "get_gate_class", "list_gates", "register_gate"]

_GATES: dict[str, type[Gate]] = {}

G = TypeVar("G", bound="type[Gate]")


def register_gate(name: str) -> Callable[[G], G]:
    """Class decorator that makes a gate available to :func:`create_gate` by ``name``."""

    def decorator(cls: G) -> G:
        if name in _GATES:
            raise ValueError(
                f"gate name {name!r} is already registered to {_GATES[name].__qualname__}"
            )
        if not (isinstance(cls, type) and issubclass(cls, Gate)):
            raise TypeError(f"register_gate expects a Gate subclass, got {cls!r}")
        _GATES[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def get_gate_class(name: str) -> type[Gate]:
    """The class registered under ``name``; ValueError listing the names otherwise."""
    if name not in _GATES:
        raise ValueError(f"unknown gate {name!r}; available: {', '.join(sorted(_GATES))}")
    return _GATES[name]


def create_gate(name: str, num_units: int, **kwargs: Any) -> Gate:
    """Build the gate registered as ``name`` over ``num_units`` units."""
    return get_gate_class(name)(num_units, **kwargs)


def list_gates() -> list[str]:
    """Names of the registered gates, sorted."""
    return sorted(_GATES)


class Gate(nn.Module, ABC):
    """Base class of all gates. Subclasses implement :meth:`mask`, :meth:`kl` and
    :meth:`gate_values`; the base class checks inputs and applies the mask."""

    registry_name: str = ""

    def __init__(self, num_units: int, kl_scale: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
            raise ValueError(f"num_units must be a positive int, got {num_units!r}")
        _check_non_negative("kl_scale", kl_scale)
        self.num_units = num_units
        self.kl_scale = float(kl_scale)
        # When True, eval mode draws masks from the posterior instead of using
        # the deterministic test-time values (Monte-Carlo predictive).
        self.mc_sampling = False

    # -- the protocol -------------------------------------------------------------
    @abstractmethod
    def mask(self, x: Tensor) -> Tensor:
        """The mask for input ``x``: shape (K,) or (N, K), applied over dimension 1."""

    @abstractmethod
    def kl(self) -> Tensor:
        """The gate's regularisation term (unscaled), a scalar tensor."""

    @abstractmethod
    def gate_values(self) -> Tensor:
        """Deterministic test-time value per unit, shape (K,); zero for pruned units."""

    def keep_mask(self) -> Tensor:
        """Boolean (K,): the units that survive pruning."""
        with torch.no_grad():
            return self.gate_values() != 0

    def num_kept(self) -> int:
        """How many units survive pruning."""
        return int(self.keep_mask().sum())

    # -- shared mechanics -------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.apply_mask(x, self.mask(x))

    @staticmethod
    def apply_mask(x: Tensor, m: Tensor) -> Tensor:
        """``x`` times mask ``m`` of shape (K,) or (N, K), shared over H, W for (N, K, H, W)."""
        if x.dim() == 4:  # one gate per channel
            m = m[..., None, None]
        return x * m

    def check_input(self, x: Tensor) -> None:
        """ValueError unless ``x`` is (N, K) or (N, K, H, W) with K == num_units."""
        if x.dim() not in (2, 4):
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, K) or (N, K, H, W), "
                f"got rank {x.dim()} with shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_units:
            raise ValueError(
                f"{type(self).__name__} has {self.num_units} units but the input has "
                f"{x.shape[1]} along dimension 1 (shape {tuple(x.shape)})"
            )

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, kl_scale={self.kl_scale}"


def _check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value: float) -> None:
    """ValueError naming ``name`` unless ``value`` is a number > 0."""
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_probability(name: str, value: float) -> None:
    """ValueError naming ``name`` unless 0 < ``value`` < 1."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
