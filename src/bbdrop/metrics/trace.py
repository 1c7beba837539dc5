"""Recording a model's layer shapes from one forward pass, for the paper's accounting.

:func:`trace_layers` runs the model once on an example input with forward hooks
on every ``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm1d/2d`` and ``nn.MaxPool2d``,
and returns one :class:`LayerRecord` per call, in execution order. It works for
any model built from these layer types (gated by :func:`bbdrop.attach_gates_` or
not), not only the registered ones. Whether a layer is followed by an
activation function (``relu``, ``sigmoid``, ``gelu``, ... as module or
functional call) is recorded too, since the paper counts one FLOP per
activation; functions called inside a gate are not activations of the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bbdrop.attach import PLACEMENTS, is_gated, side_effect_free

__all__ = ["LayerKind", "LayerRecord", "trace_layers"]

LayerKind = Literal["linear", "conv2d", "batchnorm", "maxpool"]
GateSide = Literal["input", "output"]


@dataclass(frozen=True)
class LayerRecord:
    """One executed layer, with the shapes of one example (batch dimension dropped).

    Attributes:
        name: qualified module name (for a gated layer, a key of
            :func:`bbdrop.units_kept`).
        kind: ``"linear"``, ``"conv2d"``, ``"batchnorm"`` or ``"maxpool"``.
        in_shape, out_shape: ``(features,)`` or ``(channels, height, width)``.
        kernel_size: (kh, kw) of a convolution or max-pool, (1, 1) otherwise.
        bias: whether a linear or convolutional layer adds a bias.
        activation: whether an activation function runs on this linear or
            convolutional layer's output before the next one (batch norm,
            pooling and dropout may come in between).
        gate_side: where :func:`bbdrop.attach_gates_` puts this layer's gate
            (``"input"`` for ``nn.Linear``, ``"output"`` for ``nn.Conv2d``); None
            for layers that take no gate.
    """

    name: str
    kind: LayerKind
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_size: tuple[int, int] = (1, 1)
    bias: bool = False
    activation: bool = False
    gate_side: GateSide | None = None

    @property
    def is_weight_layer(self) -> bool:
        """Linear or convolution: the layers between which units are pruned."""
        return self.kind in ("linear", "conv2d")

    @property
    def num_gate_units(self) -> int | None:
        """Size of this layer's gate: input features or output channels."""
        if self.gate_side == "input":
            return self.in_shape[0]
        if self.gate_side == "output":
            return self.out_shape[0]
        return None


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _linear_fields(m: nn.Module, x: Tensor) -> dict[str, Any]:
    if x.dim() != 2:
        raise ValueError(
            f"the paper's accounting expects nn.Linear inputs of shape (N, features), "
            f"got shape {tuple(x.shape)}"
        )
    return {"kind": "linear", "bias": m.bias is not None}


def _conv2d_fields(m: nn.Module, x: Tensor) -> dict[str, Any]:
    if m.groups != 1:
        raise ValueError(
            f"the paper's accounting supports ungrouped convolutions only, got groups={m.groups!r}"
        )
    return {"kind": "conv2d", "bias": m.bias is not None, "kernel_size": _pair(m.kernel_size)}


def _batchnorm_fields(m: nn.Module, x: Tensor) -> dict[str, Any]:
    return {"kind": "batchnorm"}


def _maxpool_fields(m: nn.Module, x: Tensor) -> dict[str, Any]:
    return {"kind": "maxpool", "kernel_size": _pair(m.kernel_size)}


# The recorded layer types, and what is recorded of each beyond its shapes.
RECORDERS: dict[type[nn.Module], Callable[[nn.Module, Tensor], dict[str, Any]]] = {
    nn.Linear: _linear_fields,
    nn.Conv2d: _conv2d_fields,
    nn.BatchNorm1d: _batchnorm_fields,
    nn.BatchNorm2d: _batchnorm_fields,
    nn.MaxPool2d: _maxpool_fields,
}

# Functions whose call on a layer's output counts as that layer's activation.
ACTIVATIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_,
        F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu,
        F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.softplus,
        F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid, Tensor.sigmoid,
        F.tanh, torch.tanh, Tensor.tanh,
    }
)  # fmt: skip


def _recorder_for(module: nn.Module) -> Callable[[nn.Module, Tensor], dict[str, Any]] | None:
    for cls, recorder in RECORDERS.items():
        if isinstance(module, cls):
            return recorder
    return None


class _Events(TorchFunctionMode):
    """Logs layer calls (from hooks) and activation calls (from torch functions)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[LayerRecord | None] = []  # None marks an activation
        self.gate_depth = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self.gate_depth == 0 and func in ACTIVATIONS:
            self.events.append(None)
        return func(*args, **(kwargs or {}))


def _layer_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
    return names


def trace_layers(model: nn.Module, example_input: Tensor) -> list[LayerRecord]:
    """The model's linear, convolutional, batch-norm and max-pool calls, in order.

    Args:
        model: any ``nn.Module``; it runs once in eval mode without gradients, and
            its modes and buffers are restored afterwards.
        example_input: a batch (one example suffices) that ``model`` accepts.

    Raises:
        ValueError: if no linear or convolutional layer runs, or a layer is used
            in a way the paper's accounting does not cover (see the recorders).
    """
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise ValueError(
            "example_input must be a batched tensor (N, ...), got "
            f"{getattr(example_input, 'shape', example_input)!r}"
        )
    log = _Events()
    record = _record_into(log, _layer_names(model))
    handles = []

    def enter_gated(module: nn.Module, args: tuple[Any, ...]) -> None:
        log.gate_depth += 1

    def leave_gated(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        log.gate_depth -= 1
        record(module, args, output)

    # What runs in a gated layer's call, its gate's hooks included (before and after
    # the gate's own), is not an activation of the network.
    try:
        for module in model.modules():
            if is_gated(module):
                handles.append(module.register_forward_pre_hook(enter_gated, prepend=True))
                handles.append(module.register_forward_hook(leave_gated))
            elif _recorder_for(module) is not None:
                handles.append(module.register_forward_hook(record))
        with side_effect_free(model), log:
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return _with_activations(log.events)


def _record_into(
    log: _Events, names: dict[nn.Module, str]
) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
    """A forward hook that logs each call of a recorded layer type in ``log`` as a
    :class:`LayerRecord`, named by ``names`` (:func:`_layer_names`)."""

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        recorder = _recorder_for(module)
        x = args[0]
        if recorder is None or not isinstance(x, Tensor) or not isinstance(output, Tensor):
            return
        placement = PLACEMENTS.get(type(module))
        log.events.append(
            LayerRecord(
                name=names[module],
                in_shape=tuple(x.shape[1:]),
                out_shape=tuple(output.shape[1:]),
                gate_side=None if placement is None else placement.side,
                **recorder(module, x),
            )
        )

    return record


def _with_activations(events: list[LayerRecord | None]) -> list[LayerRecord]:
    records: list[LayerRecord] = []
    last_weight: int | None = None  # index in records of the latest linear/conv layer
    for event in events:
        if event is None:
            if last_weight is not None:
                records[last_weight] = replace(records[last_weight], activation=True)
                last_weight = None
            continue
        records.append(event)
        if event.is_weight_layer:
            last_weight = len(records) - 1
    if not any(r.is_weight_layer for r in records):
        raise ValueError("no nn.Linear or nn.Conv2d layer ran in the model's forward pass")
    return records
