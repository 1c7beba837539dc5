"""The paper's per-layer FLOP and memory formulas (Lee et al., Fig. 1 and Table 1).

Per layer, per example (pure functions of the unit counts, as in the authors'
public code; docs/method.md section 5):

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
  :func:`dbb_memory`, defined beside the gate in :mod:`bbdrop.gates.costs`);
* memory: weights and biases, 2 per batch-norm channel (scale and shift), the
  convolution's im2col buffer ``k_h k_w in H_out W_out``, and the gates' own.

A ``(2 n - 1)`` term is clamped at 0, so a layer with every input pruned costs
only its bias and activation. :func:`record_cost` applies them to one traced
layer, :func:`gate_cost` checks and records a gate's own cost;
:mod:`bbdrop.metrics.paper` does the accounting over a whole network.
"""

from __future__ import annotations

from dataclasses import dataclass

from bbdrop import validate
from bbdrop.gates.costs import CostFn, Pair, check_count, check_pair
from bbdrop.gates.costs import dbb_conv2d_flops as dbb_conv2d_flops
from bbdrop.gates.costs import dbb_linear_flops as dbb_linear_flops
from bbdrop.gates.costs import dbb_memory as dbb_memory
from bbdrop.metrics.trace import LayerRecord

__all__ = [
    "LayerCost",
    "batch_norm_memory",
    "conv2d_flops",
    "conv2d_memory",
    "dbb_conv2d_flops",
    "dbb_linear_flops",
    "dbb_memory",
    "gate_cost",
    "linear_flops",
    "linear_memory",
    "max_pool_flops",
    "record_cost",
]


# -- the formulas ------------------------------------------------------------------
def _multiply_adds(n: float) -> float:
    """``2 n - 1`` FLOPs for a dot product of length n (n products, n - 1 sums)."""
    return max(2.0 * n - 1.0, 0.0)


def linear_flops(
    in_features: float, out_features: float, *, bias: bool = True, activation: bool = True
) -> float:
    """``(2 in - 1) out + out [bias] + out [activation]`` FLOPs of a dense layer."""
    n_in, n_out = check_count("in_features", in_features), check_count("out_features", out_features)
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
    patch, n_out, (h, w) = _conv_sizes(in_channels, out_channels, kernel_size, out_size)
    return (_multiply_adds(patch) + bias + activation) * (h * w * n_out)


def _conv_sizes(
    in_channels: float, out_channels: float, kernel_size: Pair, out_size: Pair
) -> tuple[float, float, tuple[int, int]]:
    """A convolution's checked ``k_h k_w in`` (one patch), ``out`` and ``(H, W)``."""
    kh, kw = check_pair("kernel_size", kernel_size)
    out_hw = check_pair("out_size", out_size)
    patch = kh * kw * check_count("in_channels", in_channels)
    return patch, check_count("out_channels", out_channels), out_hw


def max_pool_flops(channels: float, kernel_size: Pair, out_size: Pair) -> float:
    """``k_h k_w`` FLOPs per output of a max-pool."""
    kh, kw = check_pair("kernel_size", kernel_size)
    h, w = check_pair("out_size", out_size)
    return kh * kw * h * w * check_count("channels", channels)


def linear_memory(in_features: float, out_features: float, *, bias: bool = True) -> float:
    """Weights ``in out`` plus ``out`` biases."""
    n_in, n_out = check_count("in_features", in_features), check_count("out_features", out_features)
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
    patch, n_out, (h, w) = _conv_sizes(in_channels, out_channels, kernel_size, out_size)
    return patch * n_out + bias * n_out + im2col * patch * h * w


def batch_norm_memory(channels: float) -> float:
    """Two values (scale and shift) per batch-norm channel."""
    return 2.0 * check_count("channels", channels)


# -- one traced layer ------------------------------------------------------------
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


def record_cost(record: LayerRecord, n_in: float, n_out: float, im2col: bool) -> LayerCost:
    """The cost of the traced layer ``record`` with ``n_in`` units entering and
    ``n_out`` leaving; ``im2col``: count a convolution's im2col buffer as memory."""
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


def gate_cost(name: str, fn: CostFn, num_units: float, shape: tuple[int, ...]) -> LayerCost | None:
    """The gate's own cost over ``num_units`` kept units; None when it costs nothing."""
    spatial = (shape[1], shape[2]) if len(shape) == 3 else None
    result = fn(num_units, spatial)
    try:
        flops, memory = (float(v) for v in result)
    except (TypeError, ValueError):
        raise ValueError(
            f"overhead[{name!r}] must return (flops, memory), got {result!r}"
        ) from None
    if not all(validate.is_number(v) and v >= 0 for v in (flops, memory)):
        raise ValueError(f"overhead[{name!r}] must return finite numbers >= 0, got {result!r}")
    if flops == 0 and memory == 0:
        return None
    return LayerCost(name, "gate", num_units, num_units, flops, memory)
