"""Putting gates into a model, and model-level helpers over all of its gates.

The paper gates the inputs of dense layers and the outputs of convolutions
(right after the convolution, before batch norm, activation and pooling).
:func:`attach_gates_` does this for any model built from ``nn.Linear`` and
``nn.Conv1d/2d/3d``, without changing the model's module tree: each gate becomes
the child ``gate`` of its layer (state_dict keys ``<layer>.gate.*`` beside the
layer's own, which keep their names) and acts through a forward hook
(:func:`gate_layer_`). The layers keep their types and attributes, so code that
reads ``layer.weight``, and PyTorch's own fast paths, keep working.

A gate acts on the feature dimension wherever its layer keeps it: the last
dimension of a ``Linear``'s (N, ..., K) input or output, dimension 1 of a
convolution's (N, C, ...). Gates compute on a canonical view, batch first and
units second, (N, K, ...): the hook moves the dimensions there and back
(:meth:`bbdrop.Gate.on_layer`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bbdrop import safety, validate
from bbdrop.gates.base import Gate, create_gate, get_gate_class, list_gates
from bbdrop.heads import (
    AttentionHeads,
    FusedHeads,
    ResolvedHeads,
    fused_attentions,
    hold_nested_,
    resolve_heads,
    route_heads_,
)
from bbdrop.hooks import remove_hooks_
from bbdrop.precision import full_precision

__all__ = [
    "active_units",
    "attach_gates_",
    "collect_masks",
    "convert_gates_",
    "gate_layer_",
    "gated_layers",
    "is_gated",
    "mc_predict",
    "mc_sampling",
    "prune_units_",
    "remove_gate_",
    "reset_active_units",
    "side_effect_free",
    "total_kl",
    "units_ever_active",
    "units_kept",
]

Side = Literal["input", "output"]


@dataclass(frozen=True)
class _Placement:
    """Where the gate of a layer type sits, the attributes that hold the layer's
    widths on either side, and the dimension of its units."""

    side: Side
    inputs: str  # the attribute of the features or channels read
    outputs: str  # ... and of those written
    feature_dim: int  # where the units are in the layer's input and output

    def num_units(self, layer: nn.Module) -> int:
        """The units of the gate: the layer's width on the gate's side."""
        return self.width(layer, self.side)

    def width(self, layer: nn.Module, side: Side) -> int:
        return int(getattr(layer, self.inputs if side == "input" else self.outputs))

    def set_width(self, layer: nn.Module, side: Side, width: int) -> None:
        """Record that ``layer`` now has ``width`` units on ``side`` (after its weight
        was cut to them)."""
        setattr(layer, self.inputs if side == "input" else self.outputs, width)


_CONV = ("output", "in_channels", "out_channels", 1)
# Where the paper puts a gate on each layer type, and the layer's widths.
# Exact types only: a subclass (e.g. the Linear inside nn.MultiheadAttention,
# whose weight is read directly) may not call its own forward.
PLACEMENTS: dict[type[nn.Module], _Placement] = {
    nn.Linear: _Placement("input", "in_features", "out_features", -1),
    nn.Conv1d: _Placement(*_CONV),
    nn.Conv2d: _Placement(*_CONV),
    nn.Conv3d: _Placement(*_CONV),
}


# -- one gated layer: the gate as the child "gate", acting through hooks ---------------
def _gate_input(layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the gate on the layer's input."""
    gate = layer.gate
    return (full_precision(_dtype(gate), gate.on_layer, _first(layer, args)), *args[1:])


def _gate_output(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Forward hook: the gate on the layer's output."""
    return full_precision(_dtype(layer.gate), layer.gate.on_layer, output)


def _gate_owns(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Forward hook of a gate that owns its layer's computation (per-weight noise,
    :meth:`bbdrop.Gate.layer_forward`): its result replaces the layer's own (which
    is computed, and thrown away: a hook cannot skip it)."""
    gate, x, side = layer.gate, _first(layer, args), layer.gate.bound_side()

    def owned(x: Tensor) -> Tensor:
        if side == "input":  # units removed for good: zero in training too
            return gate.layer_forward(layer, gate.zero_removed(x, gate.layout), side)
        return gate.zero_removed(gate.layer_forward(layer, x, side), gate.layout)

    return full_precision(_dtype(gate), owned, x, out=output.dtype)


def _gate_shared(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Forward hook on a further module of a gate's coupled group: the mask the gate drew
    at its own layer in this pass, on the module's output."""
    gate = module.__dict__["_bbdrop_gate"]
    return full_precision(_dtype(gate), lambda y: gate.on_layer(y, again=True), output)


def _check_owned(layer: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook beside :func:`_gate_owns`: the gate's checks of the input come
    before the layer's own computation, whose errors would be torch's."""
    gate, x = layer.gate, _first(layer, args)

    def check(x: Tensor) -> Tensor:
        if gate.bound_side() == "input":  # the units are the input's
            gate.check_input(gate.canonical(x))
        else:
            gate.check_tensor(x)
        return x

    full_precision(_dtype(gate), check, x)


def _dtype(gate: Gate) -> torch.dtype:
    """The dtype a gate computes in (its parameters' or buffers'; under autocast, its
    hook converts the activations to it: bbdrop.precision)."""
    for t in (*gate.parameters(), *gate.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


_HOOKS = (_gate_input, _gate_output, _gate_owns, _check_owned, _gate_shared)


def _first(layer: nn.Module, args: tuple[Any, ...]) -> Tensor:
    if not args:
        raise TypeError(
            f"a gated {type(layer).__name__} takes its input as a positional argument, "
            "e.g. layer(x), not layer(input=x)"
        )
    return args[0]


def is_gated(module: nn.Module) -> bool:
    """Whether ``module`` carries a bbdrop gate (:func:`gate_layer_`)."""
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
    return isinstance(module._modules.get("gate"), Gate) and any(fn in _HOOKS for fn in hooks)


def gate_layer_(layer: nn.Module, gate: Gate, side: Side, *, batch_dim: int = 0) -> nn.Module:
    """Put ``gate`` on ``layer``'s input (``side="input"``) or output, in place, and return
    ``layer``: the gate becomes its child ``layer.gate`` and acts through a forward
    hook (the whole forward pass, for a gate that owns its layer's computation).

    ``batch_dim`` is where the batch is in the layer's input and output (1 for a
    ``Linear`` that reads (T, N, K), as in a transformer with ``batch_first=False``);
    the units are on the last dimension for ``nn.Linear``, on dimension 1 otherwise.
    """
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    if not isinstance(gate, Gate):
        raise TypeError(f"gate must be a bbdrop Gate, got {type(gate).__name__}")
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
    if is_gated(layer):
        raise ValueError(
            f"this {type(layer).__name__} is already gated; attach gates once, or use "
            "convert_gates_ to change their kind"
        )
    if hasattr(layer, "gate"):
        raise ValueError(
            f"this {type(layer).__name__} has an attribute 'gate' of its own, where bbdrop "
            "would put its gate; rename it"
        )
    if batch_dim not in (0, 1):
        raise ValueError(f"batch_dim must be 0 or 1, got {batch_dim!r}")
    feature_dim = -1 if isinstance(layer, nn.Linear) else 1
    gate.layout = (batch_dim, feature_dim)
    gate.bind(layer, side)  # may refuse the layer: nothing has changed yet
    layer.gate = gate
    _hook(layer)
    return layer


def _hook(layer: nn.Module) -> None:
    """Register the hooks that apply ``layer.gate`` (after removing any of bbdrop's)."""
    _unhook(layer)
    gate = layer.gate
    if type(gate).layer_forward is not Gate.layer_forward:
        layer.register_forward_pre_hook(_check_owned)
        layer.register_forward_hook(_gate_owns)
    elif gate.bound_side() == "input":
        layer.register_forward_pre_hook(_gate_input)
    else:
        layer.register_forward_hook(_gate_output)


def _unhook(layer: nn.Module) -> None:
    """Remove bbdrop's hooks from ``layer`` (found by function: a copy of a model holds
    the same hook functions, not the handles that registered them)."""
    remove_hooks_(layer, _HOOKS)


def remove_gate_(layer: nn.Module) -> nn.Module:
    """Take the gate and its hooks off ``layer``, in place, and off the further modules
    of its group: the plain layer (and modules) again."""
    gate = layer._modules.get("gate")
    if isinstance(gate, Gate):
        for module in gate.shared_with:
            _unhook(module)
            module.__dict__.pop("_bbdrop_gate", None)
        gate.shared_with = []
        del layer.gate
    _unhook(layer)
    return layer


def share_gate_(module: nn.Module, gate: Gate) -> None:
    """Put ``gate`` (on its own layer already) on ``module``'s output too: a further module
    of its coupled group. The module keeps a plain reference (the gate's state is
    saved once, with its layer)."""
    if is_gated(module) or "_bbdrop_gate" in module.__dict__:
        raise ValueError(f"this {type(module).__name__} carries a gate already")
    module.__dict__["_bbdrop_gate"] = gate  # not a child: no second copy in state_dict
    gate.shared_with.append(module)
    module.register_forward_hook(_gate_shared)


def _batch_dim(parent: nn.Module | None, layer: nn.Module) -> int:
    """1 for a Linear beside an ``nn.MultiheadAttention`` with ``batch_first=False`` (the
    layers of PyTorch's transformer blocks then read (T, N, K)), else 0."""
    if parent is None or not isinstance(layer, nn.Linear):
        return 0
    attention = [m for m in parent.children() if isinstance(m, nn.MultiheadAttention)]
    return 1 if any(not m.batch_first for m in attention) else 0


def attach_gates_(
    model: nn.Module,
    gate: str = "bb",
    *,
    example: Tensor | None = None,
    placement: Literal["groups", "layers"] | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    conv_kl_scale: float | None = None,
    pretrained: bool | None = None,
    check: tuple[Tensor, Tensor] | None = None,
    heads: Sequence[AttentionHeads] = (),
    **gate_kwargs: Any,
) -> nn.Module:
    """Put gates on ``model``, in place: the module tree, the modules' types and their
    state_dict keys stay as they were; the gates add keys ``*.gate.*``.

    Two placements (docs/method.md, "Where the gates go"):

    * ``"groups"`` (the default when ``example`` is given): one gate per coupled group
      of channels, found by tracing the model on ``example``
      (:func:`bbdrop.placement.coupled_groups`): the channels of a residual stream
      share one gate, a convolution's channels are gated after its batch norm, a
      transformer's MLP hidden units get one; groups where removing a unit would not
      be exact get none. A unit a gate switches off is then exactly zero wherever it
      is read, and :func:`bbdrop.compact` removes it from every layer of the group.
    * ``"layers"`` (the default without ``example``): the paper's rule, a gate on the
      input of every ``nn.Linear`` and the output of every ``nn.Conv1d/2d/3d``; the
      paper's networks use it, so the shipped experiments keep their results.

    Args:
        model: the network; changed in place (the trailing underscore). It may be a
            single layer (``"layers"``).
        gate: a registered gate name (:func:`bbdrop.list_gates`).
        example: a batch of inputs (two or more examples), for ``"groups"``.
        placement: ``"groups"`` or ``"layers"``; None chooses as above.
        filter_fn: ``filter_fn(qualified_name, module)``; only layers (``"layers"``) or
            groups (``"groups"``: its first gated module) it accepts are gated.
        conv_kl_scale: ``kl_scale`` for the gates of convolutions' channels, when it
            should differ from the dense layers' (``gate_kwargs["kl_scale"]``, default 1).
        pretrained: start the gates near 1 (:data:`bbdrop.safety.PRETRAINED_SETTINGS`,
            under ``gate_kwargs``), so that a trained network keeps its accuracy when
            they go on; the authors' start values (BB's ``E[pi]`` at 0.24) are for a
            network trained with its gates. None: True for ``"groups"``, False for the
            paper's ``"layers"`` (the shipped experiments' settings).
        heads: the attentions written by hand whose heads get gates
            (:class:`bbdrop.AttentionHeads`, with ``"groups"``): one unit per head,
            on the input of the attention's output projection, removed whole by
            :func:`bbdrop.compact` (:mod:`bbdrop.heads`).
        check: ``(x, y)``, held-out examples: the eval error before and right after
            attaching is measured on them, and an :class:`bbdrop.safety.AttachWarning`
            names both and the setting to change when attaching added more than 0.5
            points.
        gate_kwargs: passed to the gate's constructor.

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cls = get_gate_class(gate)  # unknown names fail before the model is touched
    if conv_kl_scale is not None and not conv_kl_scale >= 0:
        raise ValueError(f"conv_kl_scale must be >= 0, got {conv_kl_scale!r}")
    placement = placement or ("groups" if example is not None else "layers")
    if placement not in ("groups", "layers"):
        raise ValueError(f"placement must be 'groups' or 'layers', got {placement!r}")
    if pretrained if pretrained is not None else placement == "groups":
        gate_kwargs = safety.pretrained_settings(gate, **gate_kwargs)
    attentions = _resolve_heads(model, heads, placement, gate, cls)
    before = None if check is None else safety.eval_error(model, *_check_batch(check))
    for name, module in model.named_modules():
        if is_gated(module) or "_bbdrop_gate" in module.__dict__:
            raise ValueError(
                f"{name or type(model).__name__!r} is already gated; attach gates once, or "
                "use convert_gates_ to change their kind"
            )

    def make(unit_module: nn.Module, width: int) -> Gate:
        kwargs = dict(gate_kwargs)
        if conv_kl_scale is not None and not isinstance(unit_module, nn.Linear):
            kwargs["kl_scale"] = conv_kl_scale
        g = create_gate(gate, width, **kwargs)
        ref = next(unit_module.parameters(), None)
        return g if ref is None else g.to(device=ref.device, dtype=ref.dtype)

    if placement == "groups":
        fused = [] if cls.needs_bound_layer else _fused_heads(model, filter_fn)
        _attach_groups(model, cls, example, filter_fn, make, heads=bool(attentions or fused))
        for r in attentions:  # a gate per head, on the input of the output projection
            g = make(r.o, r.heads)
            g.unit_size, g.heads = r.dv, r.spec
            gate_layer_(r.o, g, "input", batch_dim=0 if r.spec.batch_first else 1)
        for spec, attention in fused:  # the same, with the fused call routed (bbdrop.heads)
            g = make(attention.out_proj, attention.num_heads)
            g.unit_size, g.heads = attention.head_dim, spec
            gate_layer_(attention.out_proj, g, "input",
                        batch_dim=0 if attention.batch_first else 1)  # fmt: skip
            route_heads_(attention)
    else:
        _attach_layers(model, filter_fn, make)
    hold_nested_(model)  # a gate cannot read a transformer's nested tensors
    if before is not None:
        after = safety.eval_error(model, *_check_batch(check))
        text = safety.check_attach(before, after, gate, attached_with=gate_kwargs)
        if text is not None:
            warnings.warn(text, safety.AttachWarning, stacklevel=2)
    return model


def _resolve_heads(
    model: nn.Module, heads: object, placement: str, gate: str, cls: type[Gate]
) -> list[ResolvedHeads]:
    """The attentions of ``heads`` found in ``model`` (:func:`bbdrop.heads.resolve_heads`),
    checked before anything changes."""
    if isinstance(heads, AttentionHeads) or not isinstance(heads, Sequence):
        raise TypeError("heads must be a list of bbdrop.AttentionHeads, e.g. heads=[spec]")
    if not heads:
        return []
    if placement != "groups":
        raise ValueError(
            "heads= goes with placement='groups' (give example=x[:8]); the paper's "
            "placement='layers' gates every layer's features"
        )
    if cls.needs_bound_layer:
        able = [n for n in list_gates() if not get_gate_class(n).needs_bound_layer]
        raise ValueError(
            f"{gate!r} takes its values from a layer's weights, feature by feature, so it "
            f"cannot gate attention heads; heads take {', '.join(able)}"
        )
    resolved = [resolve_heads(model, h) for h in heads]
    outputs = [r.spec.o for r in resolved]
    twice = sorted({o for o in outputs if outputs.count(o) > 1})
    if twice:
        raise ValueError(f"heads names the output projection {twice[0]!r} twice")
    return resolved


def _fused_heads(
    model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None
) -> list[tuple[FusedHeads, nn.MultiheadAttention]]:
    """The ``nn.MultiheadAttention`` modules whose heads take a gate (that ``filter_fn``
    accepts, by the attention's name)."""
    modules = dict(model.named_modules())
    return [(spec, modules[spec.attention]) for spec in fused_attentions(model)[0]
            if filter_fn is None or filter_fn(spec.attention, modules[spec.attention])]  # fmt: skip


def _check_batch(check: object) -> tuple[Tensor, Tensor]:
    """``check`` as (inputs, labels); ValueError otherwise."""
    if not (isinstance(check, tuple | list) and len(check) == 2
            and all(isinstance(t, Tensor) for t in check)):  # fmt: skip
        raise ValueError(
            "check must be (x, y): held-out inputs and their labels, two tensors, e.g. "
            "check=(x_val, y_val)"
        )
    return check[0], check[1]


def _attach_layers(
    model: nn.Module,
    filter_fn: Callable[[str, nn.Module], bool] | None,
    make: Callable[[nn.Module, int], Gate],
) -> None:
    """The paper's rule: a gate on the input of each Linear, the output of each convolution."""

    def chosen(name: str, layer: nn.Module) -> bool:
        return type(layer) in PLACEMENTS and (filter_fn is None or bool(filter_fn(name, layer)))

    # Every check before the first change: a refused call leaves the model as it was.
    targets = list(_targets(model, chosen))
    if not targets:
        looked_for = ", ".join(f"nn.{t.__name__}" for t in PLACEMENTS)
        where = " that filter_fn accepts" if filter_fn is not None else ""
        raise ValueError(
            f"no layer to gate: {type(model).__name__} has no {looked_for}{where} "
            "(exact types: gates go on their inputs or outputs)"
        )
    built = [(parent, layer, make(layer, PLACEMENTS[type(layer)].num_units(layer)))
             for parent, layer in targets]  # fmt: skip
    for parent, layer, g in built:
        gate_layer_(layer, g, PLACEMENTS[type(layer)].side, batch_dim=_batch_dim(parent, layer))


def _attach_groups(
    model: nn.Module,
    cls: type[Gate],
    example: Tensor | None,
    filter_fn: Callable[[str, nn.Module], bool] | None,
    make: Callable[[nn.Module, int], Gate],
    *,
    heads: bool = False,
) -> None:
    """One gate per coupled group (:func:`bbdrop.placement.coupled_groups`), on the
    outputs of the modules that write its channels; a method whose values come from
    its layer's weights (SSL, SVD) is bound to the group's first layer."""
    from bbdrop.placement import coupled_groups

    if not isinstance(example, Tensor) or example.dim() < 1 or len(example) < 2:
        raise ValueError(
            "placement='groups' traces the network on an example batch: give "
            "example=x[:8] (two or more inputs), or placement='layers' for the paper's rule"
        )
    modules = dict(model.named_modules())
    parents = {child: m for m in model.modules() for child in m.children()}
    plans = [g for g in coupled_groups(model, example).groups
             if filter_fn is None or filter_fn(g.points[0], modules[g.points[0]])]  # fmt: skip
    if cls.needs_bound_layer:  # bound to a layer that writes the group's channels
        plans = [g for g in plans if g.layers]
    if not plans and not heads:
        raise ValueError(
            f"no group of {type(model).__name__}'s channels can take a gate (see "
            "bbdrop.placement.coupled_groups(model, example).skipped for why)"
        )
    built = []
    for plan in plans:
        home = modules[plan.layers[0] if cls.needs_bound_layer else plan.points[0]]
        g = make(home, plan.width)
        g.group_root = plan.root
        others = [modules[p] for p in plan.points if modules[p] is not home]
        built.append((home, g, others))
    for home, g, others in built:
        gate_layer_(home, g, "output", batch_dim=_batch_dim(parents.get(home), home))
        for module in others:
            share_gate_(module, g)


def _targets(
    model: nn.Module, chosen: Callable[[str, nn.Module], bool]
) -> Iterator[tuple[nn.Module | None, nn.Module]]:
    """(parent, layer) of each layer to gate, in model order; ValueError on a layer that
    is gated already."""
    parents: dict[nn.Module, nn.Module] = {}
    for name, module in model.named_modules():
        if is_gated(module):
            raise ValueError(
                f"{name or type(module).__name__!r} is already gated; attach gates once, or "
                "use convert_gates_ to change their kind"
            )
        for child in module.children():
            parents.setdefault(child, module)
    for name, module in model.named_modules():
        if not isinstance(module, Gate) and chosen(name, module):
            yield parents.get(module), module


def gated_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, layer) of each gated layer (its gate: ``layer.gate``), in model
    order."""
    for name, module in model.named_modules():
        if is_gated(module):
            yield name, module


def total_kl(model: nn.Module) -> Tensor:
    """Sum over the model's gates of ``kl_scale * regularizer(layer)`` (divide by N in
    the objective): the KL divergences of the Bayesian methods, a method's penalty
    otherwise."""
    terms = [g.gate.kl_scale * g.gate.regularizer(g) for _, g in gated_layers(model)]
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


def convert_gates_(
    model: nn.Module, gate: str = "dbb", *, pretrained: bool | None = None, **kwargs: Any
) -> nn.Module:
    """Replace each gate by a ``gate`` built from it with ``cls.from_gate(old, **kwargs)``.

    The paper's two-stage scheme is ``convert_gates_(model, "dbb", freeze_bb=True)``
    after the BB stage. Converting gates that are of that kind already is refused.
    ``pretrained`` (None: True for gates on coupled groups, as ``attach_gates_``) starts
    the new gates near what the old ones computed (:data:`bbdrop.safety.PRETRAINED_SETTINGS`,
    under ``kwargs``: DBB's input-dependent part near 1 before it has statistics).
    """
    cls = get_gate_class(gate)
    layers = list(gated_layers(model))
    if not layers:
        raise ValueError("model has no gates; call attach_gates_ first")
    grouped = any(g.gate.group_root is not None for _, g in layers)
    if pretrained if pretrained is not None else grouped:
        kwargs = safety.pretrained_settings(gate, **kwargs)
    for name, g in layers:
        if type(g.gate) is cls:
            raise ValueError(
                f"the gate of {name!r} is a {gate!r} gate already; convert_gates_ would "
                "re-initialise what it learned (convert once, from the previous stage's gates)"
            )
    new = [cls.from_gate(g.gate, **kwargs) for _, g in layers]  # all or nothing
    for (_, g), gate_ in zip(layers, new, strict=True):
        old = g.gate
        side, gate_.layout, gate_.group_root = old.bound_side(), old.layout, old.group_root
        gate_.unit_size, gate_.heads = old.unit_size, old.heads
        g.gate = gate_
        gate_.bind(g, side)
        _hook(g)  # the new method may own its layer's computation where the old did not
        for module in old.shared_with:  # the further modules of its group follow
            module.__dict__["_bbdrop_gate"] = gate_
        gate_.shared_with, old.shared_with = old.shared_with, []
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
        def record(gated: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            gate = gated.gate
            x = inputs[0]  # the gate sees the layer's input, or its (ungated) output
            seen = x if gate.bound_side() == "input" else gated.forward(x)
            seen = gate.canonical(seen)
            visit(name, gate.mask(seen).expand(seen.shape[0], -1))

        return record

    flags = [(g.gate, g.gate.mc_sampling) for _, g in layers]
    # hooked on the gated layer, not the gate (a method that owns its layer's
    # computation never calls its gate module), before the gate's own hook
    handles = [g.register_forward_pre_hook(hook(name), prepend=True) for name, g in layers]
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
