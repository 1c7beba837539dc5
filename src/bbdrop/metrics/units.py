"""Units kept and active at each boundary of a traced network, for the paper's accounting.

The accounting of :mod:`bbdrop.metrics.paper` (Lee et al., Fig. 1 and Table 1;
docs/method.md section 5) prunes at each *boundary* between consecutive weight
layers: the channels a producer computes, the layers in between (batch norm,
max-pool) and the features its consumer reads. This module finds those boundaries
in a :func:`~bbdrop.metrics.trace_layers` description (:func:`boundaries`), checks
the per-gate arguments against the network's gates (:func:`gate_arguments`), and
counts the units at one boundary under either counting rule (:func:`flow`); the
rules themselves are described in :mod:`bbdrop.metrics.paper`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from bbdrop.gates.costs import CostFn, check_count
from bbdrop.metrics.trace import LayerRecord

__all__ = [
    "Boundary",
    "Flow",
    "Keep",
    "UnitSpec",
    "boundaries",
    "flow",
    "gate_arguments",
]

UnitSpec = int | float | Tensor  # units kept: a count, or a boolean keep mask
T = TypeVar("T")


# -- the boundaries between weight layers -------------------------------------------
@dataclass(frozen=True)
class Boundary:
    """The activations between ``producer`` and ``consumer`` (indices into the records)."""

    producer: int | None
    segment: tuple[int, ...]  # batch-norm and max-pool records in between
    consumer: int | None
    channels: int  # units leaving the producer (its gate's side)
    features: int  # units entering the consumer (its gate's side)
    coarse_rank: int  # rank of one example's activations at the producer (3 or 1)

    @property
    def ratio(self) -> int:
        return self.features // self.channels


def _chain_error(layers: Sequence[LayerRecord], i: int, detail: str) -> ValueError:
    return ValueError(
        f"layer {layers[i].name!r} (input {layers[i].in_shape}) {detail}; the paper's "
        "accounting covers sequential networks of Linear/Conv2d/BatchNorm/MaxPool2d only"
    )


def boundaries(layers: Sequence[LayerRecord]) -> list[Boundary]:
    """Every boundary of the network, in order: before the first weight layer,
    between consecutive ones, after the last; ValueError where the layers do not
    chain as a sequential network of Linear/Conv2d/BatchNorm/MaxPool2d."""
    weights = [i for i, r in enumerate(layers) if r.is_weight_layer]
    if not weights:
        raise ValueError("the layer description has no linear or convolutional layer")
    bounds = []
    for producer, consumer in zip([None, *weights], [*weights, None], strict=True):
        start = 0 if producer is None else producer + 1
        stop = len(layers) if consumer is None else consumer
        segment = tuple(range(start, stop))
        if producer is not None:
            coarse = layers[producer].out_shape
        else:  # layers before the first weight layer work on the input
            coarse = layers[segment[0] if segment else weights[0]].in_shape
        fine = coarse if consumer is None else layers[consumer].in_shape
        channels, features = coarse[0], fine[0]
        if len(coarse) == len(fine):
            if channels != features:
                raise _chain_error(
                    layers, consumer, f"does not take the {channels} units before it"
                )
        elif not (len(coarse) == 3 and len(fine) == 1 and features % channels == 0):
            raise _chain_error(
                layers, consumer, f"cannot take {channels} channels as {features} features"
            )
        for i in segment:
            rank, units = len(layers[i].in_shape), layers[i].in_shape[0]
            if (rank, units) not in ((len(coarse), channels), (len(fine), features)):
                raise _chain_error(layers, i, f"does not take the {channels} units before it")
        bounds.append(Boundary(producer, segment, consumer, channels, features, len(coarse)))
    return bounds


# -- the per-gate arguments -------------------------------------------------------
@dataclass(frozen=True)
class Keep:
    """The units a gate keeps: how many, and which when known."""

    count: float
    mask: Tensor | None  # boolean (K,), when the kept units are known exactly


def _gate_names(layers: Sequence[LayerRecord]) -> dict[str, int]:
    return {r.name: r.num_gate_units for r in layers if r.num_gate_units is not None}


def _unknown(what: str, name: str, sizes: Mapping[str, int]) -> ValueError:
    return ValueError(
        f"{what} names {name!r}, which is no gateable layer of the network; "
        f"available: {', '.join(sorted(sizes)) or '(none)'}"
    )


def _per_gate(
    what: str,
    layers: Sequence[LayerRecord],
    given: Mapping[str, Any] | None,
    check: Callable[[str, Any, int], T],
) -> dict[str, T]:
    """``given`` (gate name -> value), each name checked against the network's gates and
    each value by ``check(key, value, gate size)``, ``key`` being ``what[name]``."""
    sizes = _gate_names(layers)
    out: dict[str, T] = {}
    for name, value in (given or {}).items():
        if name not in sizes:
            raise _unknown(what, name, sizes)
        out[name] = check(f"{what}[{name!r}]", value, sizes[name])
    return out


def _keep(key: str, spec: UnitSpec, size: int) -> Keep:
    """Units kept: a count, or a boolean keep mask of the gate's size."""
    if isinstance(spec, Tensor):
        if spec.dtype != torch.bool or spec.shape != (size,):
            raise ValueError(
                f"{key} must be a count or a boolean mask of shape ({size},), "
                f"got a {spec.dtype} tensor of shape {tuple(spec.shape)}"
            )
        mask = spec.detach().cpu()
        return Keep(float(mask.sum()), mask)
    count = check_count(key, spec)
    if count > size:
        raise ValueError(f"{key} must be <= {size} (the layer's units), got {spec!r}")
    return Keep(count, None)


def _active(key: str, value: float, size: int) -> float:
    """An average number of active units, at most the gate's size."""
    count = check_count(key, value)
    if count > size:
        raise ValueError(f"{key} must be <= {size}, got {value!r}")
    return count


def _cost_fn(key: str, fn: CostFn, size: int) -> CostFn:
    """A gate's own cost function."""
    if not callable(fn):
        raise ValueError(
            f"{key} must be a function (units, spatial) -> (flops, memory), got {fn!r}"
        )
    return fn


def gate_arguments(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None,
    active: Mapping[str, float] | None,
    overhead: Mapping[str, CostFn] | None,
) -> tuple[dict[str, Keep], dict[str, float], dict[str, CostFn]]:
    """``units``, ``active`` and ``overhead`` of :func:`~bbdrop.metrics.layer_costs`,
    each name checked against the network's gates and each value against its gate:
    the units kept, the running-average active units and the gates' own cost
    functions, per gate name."""
    kept = _per_gate("units", layers, units, _keep)
    running = _per_gate("active", layers, active, _active)
    costly = _per_gate("overhead", layers, overhead, _cost_fn)
    return kept, running, costly


# -- the units at one boundary --------------------------------------------------
def _kept_at(
    bound: Boundary, p: Keep | None, c: Keep | None, independent: bool
) -> tuple[float, float]:
    """(channels computed by the producer, features kept at the consumer).

    ``independent``: each side keeps its own count (the authors' rule on a
    boundary with a gate on both sides); otherwise the keep-mask intersection.
    """
    kp = float(bound.channels) if p is None else p.count
    kc = float(bound.features) if c is None else c.count
    if independent:
        return kp, kc
    r = bound.ratio
    pm = torch.ones(bound.channels, dtype=torch.bool) if p is None else p.mask
    cm = torch.ones(bound.features, dtype=torch.bool) if c is None else c.mask
    if pm is not None and cm is not None:  # exact: feature f belongs to channel f // r
        fine = cm & pm.repeat_interleave(r)
        coarse = pm & fine.view(bound.channels, r).any(dim=1)
        return float(coarse.sum()), float(fine.sum())
    return min(kp, kc), min(kc, kp * r)


class Flow(NamedTuple):
    """The units at one boundary (:func:`flow`)."""

    coarse_keep: float  # channels the producer computes: its gate's kept units
    coarse_active: float  # of those, the active ones: what the layers in between see
    fine_keep: float  # features the consumer's gate keeps
    fine_reaching: float  # of those, the ones the producer's active channels feed
    fine_active: float  # of those, the active ones: what the consumer reads


def flow(
    bound: Boundary,
    p: Keep | None,
    c: Keep | None,
    p_active: float,
    c_active: float,
    independent: bool,
) -> Flow:
    """The units at ``bound``: ``p`` and ``c`` are what the producer's and the
    consumer's gates keep (None: no gate), ``p_active`` and ``c_active`` their
    running-average numbers of active units (``math.inf``: no such gate), and
    ``independent`` is the authors' rule on a boundary with a gate on both sides."""
    coarse_keep, fine_keep = _kept_at(bound, p, c, independent)
    coarse_active = min(p_active, coarse_keep)
    if independent:  # the consumer's gate sees its own kept units
        fine_reaching = fine_keep
    else:  # those of its kept units that the producer's active channels feed
        fine_reaching = min(fine_keep, coarse_active * bound.ratio)
    fine_active = min(c_active, fine_reaching)
    return Flow(coarse_keep, coarse_active, fine_keep, fine_reaching, fine_active)
