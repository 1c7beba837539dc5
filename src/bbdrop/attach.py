"""Putting gates into a model, and model-level helpers over all of its gates.

The paper gates the inputs of dense layers and the outputs of convolutions
(right after the convolution, before batch norm, activation and pooling).
:func:`attach_gates_` does this for any model built from ``nn.Linear`` and
``nn.Conv2d`` by wrapping each such layer in a :class:`GatedLayer`; the model's
own code is not touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.gates.base import Gate, create_gate, get_gate_class

__all__ = [
    "GatedLayer",
    "active_units",
    "attach_gates_",
    "collect_masks",
    "convert_gates_",
    "gated_layers",
    "mc_predict",
    "mc_sampling",
    "prune_units_",
    "reset_active_units",
    "side_effect_free",
    "total_kl",
    "units_ever_active",
    "units_kept",
]

Side = Literal["input", "output"]


@dataclass(frozen=True)
class _Placement:
    """Where the gate of a layer type sits, and the attributes that hold the layer's
    widths on either side."""

    side: Side
    inputs: str  # the attribute of the features or channels read
    outputs: str  # ... and of those written

    def num_units(self, layer: nn.Module) -> int:
        """The units of the gate: the layer's width on the gate's side."""
        return self.width(layer, self.side)

    def width(self, layer: nn.Module, side: Side) -> int:
        return int(getattr(layer, self.inputs if side == "input" else self.outputs))

    def set_width(self, layer: nn.Module, side: Side, width: int) -> None:
        """Record that ``layer`` now has ``width`` units on ``side`` (after its weight
        was cut to them)."""
        setattr(layer, self.inputs if side == "input" else self.outputs, width)


# Where the paper puts a gate on each layer type, and the layer's widths.
# Exact types only: a subclass (e.g. the Linear inside nn.MultiheadAttention,
# whose weight is read directly) may not call its own forward.
PLACEMENTS: dict[type[nn.Module], _Placement] = {
    nn.Linear: _Placement("input", "in_features", "out_features"),
    nn.Conv2d: _Placement("output", "in_channels", "out_channels"),
}


class GatedLayer(nn.Module):
    """``layer`` with ``gate`` applied to its input (``side="input"``) or output."""

    def __init__(self, layer: nn.Module, gate: Gate, side: Side) -> None:
        super().__init__()
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {side!r}")
        if not isinstance(gate, Gate):
            raise TypeError(f"gate must be a bbdrop Gate, got {type(gate).__name__}")
        self.layer = layer
        self.gate = gate
        self.side: Side = side
        gate.bind(layer, side)

    def forward(self, x: Tensor) -> Tensor:
        return self.gate.layer_forward(self.layer, x, self.side)

    def extra_repr(self) -> str:
        return f"side={self.side!r}"


def attach_gates_(
    model: nn.Module,
    gate: str = "bb",
    *,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    conv_kl_scale: float | None = None,
    **gate_kwargs: Any,
) -> nn.Module:
    """Wrap every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` in place with a gate.

    Args:
        model: the network; changed in place (the trailing underscore).
        gate: a registered gate name (:func:`bbdrop.list_gates`).
        filter_fn: ``filter_fn(qualified_name, layer)``; only layers for which it
            returns True are gated.
        conv_kl_scale: ``kl_scale`` for the gates of convolutions, when it should
            differ from the dense layers' (``gate_kwargs["kl_scale"]``, default 1).
        gate_kwargs: passed to the gate's constructor.

    Returns:
        ``model`` (or a :class:`GatedLayer` if ``model`` itself is one layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    get_gate_class(gate)  # unknown names fail before the model is touched
    if conv_kl_scale is not None and not conv_kl_scale >= 0:
        raise ValueError(f"conv_kl_scale must be >= 0, got {conv_kl_scale!r}")

    def chosen(name: str, layer: nn.Module) -> bool:
        return type(layer) in PLACEMENTS and (filter_fn is None or bool(filter_fn(name, layer)))

    if isinstance(model, GatedLayer):
        raise ValueError("model is already a GatedLayer; attach gates to an ungated model")
    # Every check before the first change: a refused call leaves the model as it was.
    targets = [] if chosen("", model) else list(_targets(model, "", chosen))
    if not chosen("", model) and not targets:
        looked_for = " or ".join(f"nn.{t.__name__}" for t in PLACEMENTS)
        where = " that filter_fn accepts" if filter_fn is not None else ""
        raise ValueError(
            f"no layer to gate: {type(model).__name__} has no {looked_for}{where} "
            "(exact types: gates go on their inputs or outputs)"
        )

    def make(layer: nn.Module) -> GatedLayer:
        placement = PLACEMENTS[type(layer)]
        kwargs = dict(gate_kwargs)
        if conv_kl_scale is not None and isinstance(layer, nn.Conv2d):
            kwargs["kl_scale"] = conv_kl_scale
        g = create_gate(gate, placement.num_units(layer), **kwargs)
        ref = next(layer.parameters(), None)
        if ref is not None:
            g = g.to(device=ref.device, dtype=ref.dtype)
        return GatedLayer(layer, g, placement.side)

    if chosen("", model):
        return make(model)
    built = [(parent, child_name, make(child)) for parent, child_name, child in targets]
    for parent, child_name, wrapped in built:
        setattr(parent, child_name, wrapped)
    return model


def _targets(
    module: nn.Module, prefix: str, chosen: Callable[[str, nn.Module], bool]
) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, layer) of each layer to gate, outermost first; ValueError on a
    layer that is gated already."""
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, GatedLayer):
            raise ValueError(
                f"{name!r} is already gated; attach gates once, or use convert_gates_ "
                "to change their kind"
            )
        if chosen(name, child):
            yield module, child_name, child
        else:
            yield from _targets(child, f"{name}.", chosen)


def gated_layers(model: nn.Module) -> Iterator[tuple[str, GatedLayer]]:
    """(qualified name of the wrapped layer, its GatedLayer) for each gate, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, GatedLayer):
            yield name, module


def total_kl(model: nn.Module) -> Tensor:
    """Sum over the model's gates of ``kl_scale * regularizer(layer)`` (divide by N in
    the objective): the KL divergences of the Bayesian methods, a method's penalty
    otherwise."""
    terms = [g.gate.kl_scale * g.gate.regularizer(g.layer) for _, g in gated_layers(model)]
    if not terms:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=None if ref is None else ref.device)
    return torch.stack(terms).sum()


def units_kept(model: nn.Module) -> dict[str, int]:
    """Units that survive pruning, per gated layer (name -> count)."""
    return {name: g.gate.num_kept() for name, g in gated_layers(model)}


def active_units(model: nn.Module) -> dict[str, float]:
    """Average units kept per example in evaluation, per input-dependent gate."""
    out = {}
    for name, g in gated_layers(model):
        active = g.gate.active_units()
        if active is not None:
            out[name] = active
    return out


def reset_active_units(model: nn.Module) -> None:
    """Start the running averages of :func:`active_units` afresh."""
    for _, g in gated_layers(model):
        g.gate.reset_active_units()


def prune_units_(model: nn.Module, keep: dict[str, Tensor]) -> nn.Module:
    """Remove for good, in each gate named in ``keep``, the units where its mask is False."""
    layers = dict(gated_layers(model))
    for name, mask in keep.items():
        if name not in layers:
            raise ValueError(f"keep names {name!r}, which is not a gated layer of the model")
        layers[name].gate.prune_(mask)
    return model


def convert_gates_(model: nn.Module, gate: str = "dbb", **kwargs: Any) -> nn.Module:
    """Replace each gate by a ``gate`` built from it with ``cls.from_gate(old, **kwargs)``.

    The paper's two-stage scheme is ``convert_gates_(model, "dbb", freeze_bb=True)``
    after the BB stage. Converting gates that are of that kind already is refused.
    """
    cls = get_gate_class(gate)
    layers = list(gated_layers(model))
    if not layers:
        raise ValueError("model has no gates; call attach_gates_ first")
    for name, g in layers:
        if type(g.gate) is cls:
            raise ValueError(
                f"the gate of {name!r} is a {gate!r} gate already; convert_gates_ would "
                "re-initialise what it learned (convert once, from the previous stage's gates)"
            )
    new = [cls.from_gate(g.gate, **kwargs) for _, g in layers]  # all or nothing
    for (_, g), gate_ in zip(layers, new, strict=True):
        g.gate = gate_
        gate_.bind(g.layer, g.side)
    return model


@contextmanager
def mc_sampling(model: nn.Module, on: bool = True) -> Iterator[nn.Module]:
    """Within the block, gates in eval mode draw masks from the posterior (``on=False``:
    they use their test-time values, whatever an enclosing block set)."""
    gates = [g.gate for _, g in gated_layers(model)]
    previous = [g.mc_sampling for g in gates]
    for g in gates:
        g.mc_sampling = on
    try:
        yield model
    finally:
        for g, p in zip(gates, previous, strict=True):
            g.mc_sampling = p


@torch.no_grad()
def mc_predict(model: nn.Module, x: Tensor, num_samples: int = 30) -> Tensor:
    """Monte-Carlo predictive: the average of softmax(model(x)) over sampled masks."""
    validate.whole("num_samples", num_samples, lo=1)
    was_training = model.training
    model.eval()
    try:
        with mc_sampling(model):
            probs = model(x).softmax(dim=-1)
            for _ in range(num_samples - 1):
                probs += model(x).softmax(dim=-1)
    finally:
        model.train(was_training)
    return probs / num_samples


@torch.no_grad()
def collect_masks(model: nn.Module, x: Tensor, batch_size: int = 1000) -> dict[str, Tensor]:
    """The deterministic test-time mask of every gate for every example of ``x``.

    Returns name -> (N, K) on the CPU: for BB the same row for every example,
    for DBB the input-dependent values after run-time pruning. Runs the model
    in eval mode (and restores its mode), without touching the DBB statistics.
    """
    store: dict[str, list[Tensor]] = {}
    _visit_masks(model, x, batch_size, lambda name, m: store.setdefault(name, []).append(m.cpu()))
    return {name: torch.cat(parts) for name, parts in store.items()}


@torch.no_grad()
def units_ever_active(model: nn.Module, x: Tensor, batch_size: int = 1000) -> dict[str, Tensor]:
    """Per gate, a boolean (K,): the units whose test-time mask is non-zero for at
    least one example of ``x`` (the paper's pre-pruning keeps exactly these)."""
    seen: dict[str, Tensor] = {}

    def record(name: str, m: Tensor) -> None:
        active = (m != 0).any(dim=0)
        seen[name] = active if name not in seen else seen[name] | active

    _visit_masks(model, x, batch_size, record)
    return seen


def _visit_masks(
    model: nn.Module, x: Tensor, batch_size: int, visit: Callable[[str, Tensor], None]
) -> None:
    """Run ``model`` on ``x`` in eval mode and call ``visit(name, mask (B, K))`` for each
    gate and batch; restores the model's mode, MC flags and DBB statistics."""
    layers = list(gated_layers(model))
    if not layers:
        raise ValueError("model has no gates; call attach_gates_ first")

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def record(gated: GatedLayer, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]  # the gate sees the layer's input, or its (ungated) output
            seen = x if gated.side == "input" else gated.layer(x)
            visit(name, gated.gate.mask(seen).expand(x.shape[0], -1))

        return record

    flags = [(g.gate, g.gate.mc_sampling) for _, g in layers]
    # hooked on the gated layer, not the gate: a method that owns its layer's
    # computation never calls its gate module
    handles = [g.register_forward_pre_hook(hook(name)) for name, g in layers]
    # modes and buffers (e.g. DBB's active-unit counters) are restored afterwards
    with side_effect_free(model):
        try:
            for gate, _ in flags:
                gate.mc_sampling = False
            for i in range(0, x.shape[0], batch_size):
                model(x[i : i + batch_size])
        finally:
            for h in handles:
                h.remove()
            for gate, flag in flags:
                gate.mc_sampling = flag


@contextmanager
def side_effect_free(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode without gradients, then restore its modes and buffers.

    Restoring the buffers keeps batch-norm statistics and the DBB gates' running
    count of active units exactly as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for m, training in modes:
            m.training = training
