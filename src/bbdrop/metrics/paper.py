"""The FLOP and memory accounting of the paper's tables (Lee et al., Fig. 1 and Table 1).

Everything is counted per example, from a :func:`~bbdrop.metrics.trace_layers`
description of the network, so the figures compare with Lee et al.'s Fig. 1 and
Table 1 (``speedup = FLOPs(dense) / FLOPs(pruned)``,
``memory fraction = size(pruned) / size(dense)``).

Per layer (the pure functions below, as in the authors' public code):

* dense layer: ``(2 in - 1) out`` multiply-adds, ``+ out`` bias, ``+ out``
  activation;
* convolution: ``(2 k_h k_w in - 1) H_out W_out out``, ``+ H_out W_out out``
  bias, ``+ H_out W_out out`` activation;
* max-pool: ``k_h k_w`` per output; batch norm: no FLOPs;
* a gate's own run-time cost, asked of the gate (``Gate.runtime_cost``): none
  for a static gate, whose values fold into the neighbouring weights; for DBB
  ``5 K`` FLOPs on a dense layer's input, ``2 H W K + 4 K`` on a convolution's
  output (global average pooling, mask construction, multiply), and ``4 K``
  values of memory (:func:`dbb_linear_flops`, :func:`dbb_conv2d_flops`,
  :func:`dbb_memory`);
* memory: weights and biases, 2 per batch-norm channel (scale and shift), the
  convolution's im2col buffer ``k_h k_w in H_out W_out``, and the gates' own.

Conventions this module chooses (the paper leaves them implicit):

* An activation is counted where the trace saw one, so the logits layer has
  none (the authors' VGG code counts one there too: a difference of
  ``num_classes`` FLOPs).
* A ``(2 n - 1)`` term is clamped at 0, so a layer with every input pruned
  costs only its bias and activation.
* Conv biases are memory ("weights and biases"); the authors' code leaves them
  out (70 values of LeNet5-Caffe's 477 480). The im2col buffer can be left out
  with ``im2col=False``: the paper's LeNet5-Caffe memory column cannot include
  it (conv1's buffer alone is 3.0% of the dense total, yet SBP is reported at
  2.4%), and without it the BB row 15-33-138-64 gives 5.2% against the
  reported 5.07%.
* Pruning acts at each *boundary* between consecutive weight layers (linear or
  convolution). A gate on a convolution's output selects channels; a gate on a
  linear layer's input selects features. Between them, batch norm and max-pool
  layers work on whatever survives. When a convolution is flattened into a
  linear layer, each channel owns ``r = in_features / channels`` consecutive
  features (``r = H W``; ``r = 1`` after global pooling), and when both gates
  exist a feature is alive only if its own gate and its channel's gate are
  (LeNet5-Caffe's 50 conv2 channels and 800 fc1 inputs; VGG's conv13 and fc1).
  Conversely a channel is computed only if at least one of its features is
  alive. This is the default counting rule, ``rule="masks"``.
* Two counting rules, which differ only at a boundary with a gate on both
  sides (a convolution's output channels flattened into a gated dense input):

  - ``rule="masks"`` (default) counts what actually has to be computed: the
    intersection above. With boolean keep masks it is exact; with counts only,
    it is estimated by its upper bound: ``min(K_fc, K_conv r)`` features and
    ``min(K_conv, K_fc)`` channels.
  - ``rule="authors"`` is the rule of the authors' public code, which the
    paper's tables come from: each gated layer's kept count is taken on its
    own. The convolution computes its own gate's ``K_conv`` channels and the
    dense layer reads its own gate's ``K_fc`` features, whether or not they
    lie in pruned channels; a pruned channel does not reduce the dense layer's
    input count, nor a pruned feature the convolution's channels.

  The two agree whenever the dense gate's survivors all lie in surviving
  channels, each of which keeps at least one feature (training tends there: a
  feature of a dead channel is always zero, so the KL term prunes its gate).
  Elsewhere, one gate's count fixes both sides under either rule.
* DBB (run-time pruning): ``active`` gives a gate's running-average number of
  active units; the gated layer still computes its BB-kept units (``K``, which
  also sizes the gate's own cost), and everything downstream of the gate (batch
  norm, max-pool, the next layer's input) counts the active ones, for FLOPs and
  memory alike (the pruned counts use each layer's running-average number of
  active units). Under ``rule="authors"`` a gated layer on a two-gate boundary
  counts its own gate's active units. ``active`` only changes unit counts; what
  the gates themselves cost is given separately (``overhead``), and
  :func:`paper_costs` asks each of the model's gates for it.

The accounting covers sequential networks (each recorded layer consumes the
previous one's output, with element-wise functions, dropout, flattening or
untracked pooling in between); it raises ``ValueError`` where it can tell that
a network is not one. Average pooling, residual branches and grouped
convolutions are not covered.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from bbdrop.attach import gated_layers
from bbdrop.metrics.trace import LayerRecord, trace_layers

__all__ = [
    "LayerCost",
    "PaperCosts",
    "batch_norm_memory",
    "conv2d_flops",
    "conv2d_memory",
    "dbb_conv2d_flops",
    "dbb_linear_flops",
    "dbb_memory",
    "keep_masks",
    "layer_costs",
    "linear_flops",
    "linear_memory",
    "max_pool_flops",
    "memory_fraction",
    "paper_costs",
    "paper_figures",
    "paper_flops",
    "paper_memory",
    "speedup",
]

UnitSpec = int | float | Tensor  # units kept: a count, or a boolean keep mask
Pair = int | tuple[int, int]
# A gate's own test-time cost: (kept units, (H, W) of a conv output or None) -> (FLOPs, memory).
CostFn = Callable[[float, tuple[int, int] | None], tuple[float, float]]
Rule = Literal["masks", "authors"]
RULES: tuple[str, ...] = ("masks", "authors")
T = TypeVar("T")


# -- per-layer formulas ---------------------------------------------------------
def _count(name: str, value: float) -> float:
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _pair(name: str, value: Pair) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair
    ):
        raise ValueError(f"{name} must be an int >= 0 or a pair of them, got {value!r}")
    return pair[0], pair[1]


def _multiply_adds(n: float) -> float:
    """``2 n - 1`` FLOPs for a dot product of length n (n products, n - 1 sums)."""
    return max(2.0 * n - 1.0, 0.0)


def linear_flops(
    in_features: float, out_features: float, *, bias: bool = True, activation: bool = True
) -> float:
    """``(2 in - 1) out + out [bias] + out [activation]`` FLOPs of a dense layer."""
    n_in, n_out = _count("in_features", in_features), _count("out_features", out_features)
    return _multiply_adds(n_in) * n_out + (bias + activation) * n_out


def conv2d_flops(
    in_channels: float,
    out_channels: float,
    kernel_size: Pair,
    out_size: Pair,
    *,
    bias: bool = True,
    activation: bool = True,
) -> float:
    """``(2 k_h k_w in - 1) H W out`` FLOPs, plus one per output each for bias and activation."""
    kh, kw = _pair("kernel_size", kernel_size)
    h, w = _pair("out_size", out_size)
    patch = kh * kw * _count("in_channels", in_channels)
    outputs = h * w * _count("out_channels", out_channels)
    return (_multiply_adds(patch) + bias + activation) * outputs


def max_pool_flops(channels: float, kernel_size: Pair, out_size: Pair) -> float:
    """``k_h k_w`` FLOPs per output of a max-pool."""
    kh, kw = _pair("kernel_size", kernel_size)
    h, w = _pair("out_size", out_size)
    return kh * kw * h * w * _count("channels", channels)


def dbb_linear_flops(num_gates: float) -> float:
    """``5 K``: a DBB gate on K dense units (mask construction and multiplication)."""
    return 5.0 * _count("num_gates", num_gates)


def dbb_conv2d_flops(num_gates: float, size: Pair) -> float:
    """``2 H W K + 4 K``: a DBB gate on K channels of H x W (pooling, mask, multiply)."""
    h, w = _pair("size", size)
    k = _count("num_gates", num_gates)
    return 2.0 * h * w * k + 4.0 * k


def linear_memory(in_features: float, out_features: float, *, bias: bool = True) -> float:
    """Weights ``in out`` plus ``out`` biases."""
    n_in, n_out = _count("in_features", in_features), _count("out_features", out_features)
    return n_in * n_out + bias * n_out


def conv2d_memory(
    in_channels: float,
    out_channels: float,
    kernel_size: Pair,
    out_size: Pair,
    *,
    bias: bool = True,
    im2col: bool = True,
) -> float:
    """Weights ``k_h k_w in out``, ``out`` biases and the im2col buffer ``k_h k_w in H W``."""
    kh, kw = _pair("kernel_size", kernel_size)
    h, w = _pair("out_size", out_size)
    patch = kh * kw * _count("in_channels", in_channels)
    n_out = _count("out_channels", out_channels)
    return patch * n_out + bias * n_out + im2col * patch * h * w


def batch_norm_memory(channels: float) -> float:
    """Two values (scale and shift) per batch-norm channel."""
    return 2.0 * _count("channels", channels)


def dbb_memory(num_gates: float) -> float:
    """Four values per DBB gate unit."""
    return 4.0 * _count("num_gates", num_gates)


# -- pruned counts over a traced network ------------------------------------------
@dataclass(frozen=True)
class LayerCost:
    """The paper's cost of one layer, or with ``kind="gate"`` of the gate named
    ``name`` itself (``in_units == out_units``: the kept units it works on)."""

    name: str
    kind: str
    in_units: float
    out_units: float
    flops: float
    memory: float


@dataclass(frozen=True)
class _Keep:
    count: float
    mask: Tensor | None  # boolean (K,), when the kept units are known exactly


@dataclass(frozen=True)
class _Boundary:
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


def _boundaries(layers: Sequence[LayerRecord]) -> list[_Boundary]:
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
        bounds.append(_Boundary(producer, segment, consumer, channels, features, len(coarse)))
    return bounds


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


def _keep(key: str, spec: UnitSpec, size: int) -> _Keep:
    """Units kept: a count, or a boolean keep mask of the gate's size."""
    if isinstance(spec, Tensor):
        if spec.dtype != torch.bool or spec.shape != (size,):
            raise ValueError(
                f"{key} must be a count or a boolean mask of shape ({size},), "
                f"got a {spec.dtype} tensor of shape {tuple(spec.shape)}"
            )
        mask = spec.detach().cpu()
        return _Keep(float(mask.sum()), mask)
    count = _count(key, spec)
    if count > size:
        raise ValueError(f"{key} must be <= {size} (the layer's units), got {spec!r}")
    return _Keep(count, None)


def _active(key: str, value: float, size: int) -> float:
    """An average number of active units, at most the gate's size."""
    count = _count(key, value)
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


def _kept_at(
    bound: _Boundary, p: _Keep | None, c: _Keep | None, independent: bool
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


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")


def layer_costs(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
    im2col: bool = True,
) -> list[LayerCost]:
    """The paper's per-example cost of every layer and costly gate, in execution order.

    Args:
        layers: the network, from :func:`~bbdrop.metrics.trace_layers`.
        units: units kept per gated layer (gate name -> count, or boolean keep
            mask of the gate's size), e.g. :func:`bbdrop.units_kept` or
            :func:`keep_masks`; layers left out keep all their units.
        active: for input-dependent (DBB) gates, the running-average number of
            active units (:func:`bbdrop.active_units`); it changes the unit
            counts downstream of the gate only, not what the gate costs.
        overhead: gate name -> the gate's own test-time cost function
            ``(kept units, (H, W) of a conv output or None) -> (FLOPs, memory)``,
            e.g. a gate's bound ``runtime_cost``. Each gate whose cost over its
            kept units is not zero adds a :class:`LayerCost` of kind ``"gate"``,
            just before its layer (a gate on the layer's input) or just after it
            (on its output).
        rule: ``"masks"`` (what is actually computed) or ``"authors"`` (each
            gated layer's own count); see the module's docstring.
        im2col: count the convolutions' im2col buffers as memory.
    """
    _check_rule(rule)
    kept = _per_gate("units", layers, units, _keep)
    running = _per_gate("active", layers, active, _active)
    costly = _per_gate("overhead", layers, overhead, _cost_fn)
    in_units: dict[int, float] = {}
    out_units: dict[int, float] = {}
    gates_after: dict[int, LayerCost] = {}  # the gate on a layer's output
    gates_before: dict[int, LayerCost] = {}  # the gate on a layer's input

    for bound in _boundaries(layers):
        producer = None if bound.producer is None else layers[bound.producer]
        consumer = None if bound.consumer is None else layers[bound.consumer]
        # The gate on the producer's output and the one on the consumer's input, if any.
        p_gate = _gate_name(producer, "output")
        c_gate = _gate_name(consumer, "input")
        independent = rule == "authors" and p_gate is not None and c_gate is not None
        coarse_keep, fine_keep = _kept_at(bound, kept.get(p_gate), kept.get(c_gate), independent)
        coarse_active = min(running.get(p_gate, math.inf), coarse_keep)
        if independent:  # the consumer's gate sees its own kept units
            fine_reaching = fine_keep
        else:  # those of its kept units that the producer's active channels feed
            fine_reaching = min(fine_keep, coarse_active * bound.ratio)
        fine_active = min(running.get(c_gate, math.inf), fine_reaching)

        if producer is not None and bound.producer is not None:
            out_units[bound.producer] = coarse_keep
            if p_gate in costly:
                cost = _gate_cost(p_gate, costly[p_gate], coarse_keep, producer.out_shape)
                if cost is not None:
                    gates_after[bound.producer] = cost
        for i in bound.segment:
            coarse_level = len(layers[i].in_shape) == bound.coarse_rank
            in_units[i] = out_units[i] = coarse_active if coarse_level else fine_reaching
        if consumer is not None and bound.consumer is not None:
            in_units[bound.consumer] = fine_active
            if c_gate in costly:
                cost = _gate_cost(c_gate, costly[c_gate], fine_keep, consumer.in_shape)
                if cost is not None:
                    gates_before[bound.consumer] = cost

    costs: list[LayerCost] = []
    for i, record in enumerate(layers):
        if i in gates_before:
            costs.append(gates_before[i])
        costs.append(_cost(record, in_units[i], out_units[i], im2col))
        if i in gates_after:
            costs.append(gates_after[i])
    return costs


def _gate_name(record: LayerRecord | None, side: str) -> str | None:
    """The layer's name if it takes its gate on ``side``; None otherwise (never a dict key)."""
    return record.name if record is not None and record.gate_side == side else None


def _gate_cost(name: str, fn: CostFn, num_units: float, shape: tuple[int, ...]) -> LayerCost | None:
    """The gate's own cost over ``num_units`` kept units; None when it costs nothing."""
    spatial = (shape[1], shape[2]) if len(shape) == 3 else None
    result = fn(num_units, spatial)
    try:
        flops, memory = (float(v) for v in result)
    except (TypeError, ValueError):
        raise ValueError(
            f"overhead[{name!r}] must return (flops, memory), got {result!r}"
        ) from None
    if not all(math.isfinite(v) and v >= 0 for v in (flops, memory)):
        raise ValueError(f"overhead[{name!r}] must return finite numbers >= 0, got {result!r}")
    if flops == 0 and memory == 0:
        return None
    return LayerCost(name, "gate", num_units, num_units, flops, memory)


def _cost(record: LayerRecord, n_in: float, n_out: float, im2col: bool) -> LayerCost:
    if record.kind == "linear":
        flops = linear_flops(n_in, n_out, bias=record.bias, activation=record.activation)
        memory = linear_memory(n_in, n_out, bias=record.bias)
    elif record.kind == "conv2d":
        size = (record.out_shape[1], record.out_shape[2])
        flops = conv2d_flops(
            n_in, n_out, record.kernel_size, size, bias=record.bias, activation=record.activation
        )
        memory = conv2d_memory(
            n_in, n_out, record.kernel_size, size, bias=record.bias, im2col=im2col
        )
    elif record.kind == "maxpool":
        flops = max_pool_flops(
            n_out, record.kernel_size, (record.out_shape[1], record.out_shape[2])
        )
        memory = 0.0
    elif record.kind == "batchnorm":
        flops, memory = 0.0, batch_norm_memory(n_out)
    else:
        raise ValueError(f"unknown layer kind {record.kind!r} of layer {record.name!r}")
    return LayerCost(record.name, record.kind, n_in, n_out, flops, memory)


def paper_flops(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
) -> float:
    """Per-example FLOPs in the paper's accounting (dense when ``units`` is None)."""
    costs = layer_costs(layers, units, active, overhead=overhead, rule=rule)
    return sum(c.flops for c in costs)


def paper_memory(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
    im2col: bool = True,
) -> float:
    """Values to store in the paper's accounting (dense when ``units`` is None)."""
    costs = layer_costs(layers, units, active, overhead=overhead, rule=rule, im2col=im2col)
    return sum(c.memory for c in costs)


def speedup(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
) -> float:
    """``FLOPs(dense) / FLOPs(pruned)``; the dense network has no gates."""
    pruned = paper_flops(layers, units, active, overhead=overhead, rule=rule)
    return paper_flops(layers) / pruned if pruned > 0 else math.inf


def memory_fraction(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    overhead: Mapping[str, CostFn] | None = None,
    rule: Rule = "masks",
    im2col: bool = True,
) -> float:
    """``size(pruned) / size(dense)`` (the paper's "memory", as a fraction)."""
    pruned = paper_memory(layers, units, active, overhead=overhead, rule=rule, im2col=im2col)
    return pruned / paper_memory(layers, im2col=im2col)


# -- the same, from a model --------------------------------------------------------
@dataclass(frozen=True)
class PaperCosts:
    """The paper's figures for one network: pruned and full FLOPs and memory."""

    flops: float
    memory: float
    full_flops: float
    full_memory: float
    layers: tuple[LayerCost, ...]

    @property
    def speedup(self) -> float:
        """``FLOPs(dense) / FLOPs(pruned)``."""
        return self.full_flops / self.flops if self.flops > 0 else math.inf

    @property
    def memory_fraction(self) -> float:
        """``size(pruned) / size(dense)``."""
        return self.memory / self.full_memory


def keep_masks(model: nn.Module) -> dict[str, Tensor]:
    """Boolean keep mask of every gate of ``model`` (gate name -> (K,) mask)."""
    return {name: g.gate.keep_mask() for name, g in gated_layers(model)}


def _gate_overheads(model: nn.Module) -> dict[str, CostFn]:
    """Each gate's own test-time cost function (gate name -> its ``runtime_cost``)."""
    return {name: g.gate.runtime_cost for name, g in gated_layers(model)}


def _costs_of(
    layers: Sequence[LayerRecord],
    units: Mapping[str, UnitSpec],
    active: Mapping[str, float] | None,
    overhead: Mapping[str, CostFn],
    rule: Rule,
    im2col: bool,
) -> PaperCosts:
    pruned = layer_costs(layers, units, active, overhead=overhead, rule=rule, im2col=im2col)
    full = layer_costs(layers, im2col=im2col)
    return PaperCosts(
        flops=sum(c.flops for c in pruned),
        memory=sum(c.memory for c in pruned),
        full_flops=sum(c.flops for c in full),
        full_memory=sum(c.memory for c in full),
        layers=tuple(pruned),
    )


def paper_costs(
    model: nn.Module,
    example_input: Tensor,
    units: Mapping[str, UnitSpec] | None = None,
    active: Mapping[str, float] | None = None,
    *,
    rule: Rule = "masks",
    im2col: bool = True,
) -> PaperCosts:
    """Trace ``model`` on ``example_input`` and count the paper's figures.

    ``units`` defaults to the keep masks of the model's gates (none: the dense
    network). Every gate's own test-time cost (``Gate.runtime_cost``, nothing
    for a static gate) is counted over its kept units. Pass
    ``active=bbdrop.active_units(model)`` after an evaluation pass to count
    DBB's run-time pruning. ``rule`` picks the counting rule (module docstring).
    """
    _check_rule(rule)
    layers = trace_layers(model, example_input)
    if units is None:
        units = keep_masks(model)
    return _costs_of(layers, units, active, _gate_overheads(model), rule, im2col)


def paper_figures(
    model: nn.Module, example_input: Tensor, active: Mapping[str, float] | None = None
) -> dict[str, float]:
    """The paper's figures for ``model`` under both counting rules, as one flat dict.

    The pruned network is that of the gates' keep masks, with each gate's own
    test-time cost and, given ``active`` (:func:`bbdrop.active_units`), DBB's
    run-time pruning, as in :func:`paper_costs`. Keys (``*_authors``: the
    authors' count rule, the others the keep-mask rule; see the module docstring):

    * ``speedup``, ``speedup_authors``: ``FLOPs(dense) / FLOPs(pruned)``;
    * ``memory``, ``memory_authors``: ``size(pruned) / size(dense)`` with the
      convolutions' im2col buffers;
    * ``memory_params``, ``memory_params_authors``: the same without them
      (``im2col=False``): weights, biases, batch-norm and gate values only;
    * ``flops``: pruned FLOPs per example (keep-mask rule); ``flops_dense``:
      the dense network's.
    """
    layers = trace_layers(model, example_input)
    units = keep_masks(model)
    overhead = _gate_overheads(model)

    def costs(rule: Rule, im2col: bool) -> PaperCosts:
        return _costs_of(layers, units, active, overhead, rule, im2col)

    masks, authors = costs("masks", True), costs("authors", True)
    return {
        "speedup": masks.speedup,
        "speedup_authors": authors.speedup,
        "memory": masks.memory_fraction,
        "memory_authors": authors.memory_fraction,
        "memory_params": costs("masks", False).memory_fraction,
        "memory_params_authors": costs("authors", False).memory_fraction,
        "flops": masks.flops,
        "flops_dense": masks.full_flops,
    }
