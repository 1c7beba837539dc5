"""The gate protocol that every sparsification method implements, and its registry.

A gate multiplies unit k of its input by a learned value. It computes on a
canonical layout, the batch first and the units second: (N, K) for a dense
activation, (N, K, ...) for a convolution's channels or a dense layer's features
at several positions (tokens); :meth:`Gate.on_layer` moves a layer's own layout
(``layout``: where its batch and units are, set when the gate is put on the layer)
there and back. The trainer, the metrics and the pipeline talk to gates only
through this class and never ask which method they hold:

* ``forward(x)``: the gated activations (stochastic in training mode);
* ``bind(layer, side)``: called once when the gate is put on ``layer``
  (:func:`bbdrop.gate_layer_`); a
  method whose state has the layer's shape (per-weight variances) or whose
  values are computed from the layer's weights (group norms) sets itself up
  here and may keep a reference to the layer (:meth:`bound_layer`, and the side
  it is on: :meth:`bound_side`);
* ``layer_forward(layer, x, side)``: the gated layer's whole forward pass; by
  default the gate on the layer's input or output (what the layer's hooks
  compute), overridden by a method that owns its layer's computation (per-weight
  noise), whose result then replaces the layer's own;
* ``regularizer(layer)``: the method's term of the objective, a scalar (a KL
  divergence for the Bayesian methods, a penalty otherwise, possibly over the
  layer's weights); the objective adds ``kl_scale * regularizer(layer) / N``;
* ``gate_values()``: the deterministic, input-independent test-time value of
  each unit, exactly zero for a pruned unit;
* ``keep_mask()`` / ``num_kept()``: which units survive, and how many;
* ``prune_(keep)``: remove units for good (the pipeline's pre-pruning);
* ``input_dependent``: True for a gate whose test-time mask depends on the input;
* ``to_module(units)``: for an input-dependent gate, its test-time computation on the
  kept units ``units`` as a plain module (a :class:`TestTimeMask`, which
  :func:`bbdrop.compact` puts beside the layer, a compact file holds and
  :func:`bbdrop.runtime_pruned` skips by); None for a static gate;
* ``untrained_reason()``: why the gate cannot be compacted yet (an input-dependent
  gate without its statistics), or None;
* ``active_units()`` / ``reset_active_units()``: for input-dependent gates, the
  average number of units switched on per evaluated example; None for static
  gates, whose cost is that of their kept units;
* ``after_step(lr, num_train)``: called by the trainer after every optimiser
  step (a proximal step on the layer's weights; nothing by default), on the gates
  that declare ``steps_after_optimiser = True``: a class that overrides
  ``after_step`` without declaring it is refused when it is defined;
* ``fold(layer, side)``: the weight and bias of a plain layer that computes in
  evaluation what the gated layer computes (:func:`bbdrop.compact` builds the
  smaller network from them);
* ``runtime_cost(num_units, spatial)``: the extra (FLOPs, memory) per example
  that the gate itself costs at test time, for the paper's accounting;
* ``from_gate(gate)``: build this method's gate from a trained gate of another
  (the two-stage scheme), or a clear error where a method cannot.

Two more class attributes say what a method needs, for the tests that every method
must pass: ``needs_bound_layer`` (its values come from the layer it is bound to, so it
works on a layer only, not as a module of its own) and ``deterministic_training``
(its training forward pass draws no noise).

Statistics a gate keeps (running means, active-unit counters) are buffers, so
that code which must leave them untouched saves and restores the buffers.
A method's constructor takes ``num_units`` and its settings, declared as a
:class:`~bbdrop.gates.settings.GateSettings` dataclass (``Settings``) that its
constructor builds to check them and that configurations are checked against.
A new method is one subclass in its own file plus ``@register_gate("name")``; an
input-dependent one adds its :class:`TestTimeMask` subclass, in the same file or
beside it. :func:`registered_gate` registers a method for a ``with`` block only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.gates.masks import TestTimeMask, apply_units, from_units_second, units_second
from bbdrop.gates.settings import GateSettings, settings_from_signature

__all__ = [
    "Gate",
    "TestTimeMask",
    "create_gate",
    "get_gate_class",
    "list_gates",
    "register_gate",
    "registered_gate",
    "settings_type",
]

_GATES: dict[str, type[Gate]] = {}
# Whether torch.compile (or torch.export) is tracing; torch.compiler's since torch 2.3
_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling

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


@contextmanager
def registered_gate(name: str, cls: type[Gate]) -> Iterator[type[Gate]]:
    """``cls`` registered as ``name`` (:func:`register_gate`) for the ``with`` block only:
    a method defined in a test or a notebook, gone from the registry afterwards."""
    own = cls.__dict__.get("registry_name")
    register_gate(name)(cls)
    try:
        yield cls
    finally:
        del _GATES[name]
        if own is None:
            del cls.registry_name
        else:
            cls.registry_name = own


def get_gate_class(name: str) -> type[Gate]:
    """The class registered under ``name``; ValueError listing the names otherwise."""
    if name not in _GATES:
        raise ValueError(f"unknown gate {name!r}; available: {', '.join(sorted(_GATES))}")
    return _GATES[name]


def settings_type(name: str) -> type[GateSettings]:
    """The settings dataclass of the method registered as ``name``: its ``Settings``, or
    for a method that declares none, one made from its constructor's signature."""
    cls = get_gate_class(name)
    return cls.Settings if cls.Settings is not GateSettings else settings_from_signature(cls)


def create_gate(name: str, num_units: int, **kwargs: Any) -> Gate:
    """Build the gate registered as ``name`` over ``num_units`` units."""
    return get_gate_class(name)(num_units, **kwargs)


def list_gates() -> list[str]:
    """Names of the registered gates, sorted."""
    return sorted(_GATES)


class Gate(nn.Module, ABC):
    """Base class of all gates. Subclasses implement :meth:`mask`, :meth:`regularizer`
    and :meth:`gate_values`; the base class checks inputs, applies the mask and
    holds the units removed for good (``static_keep``)."""

    registry_name: str = ""
    # The method's settings: its constructor's keyword arguments as a dataclass, with
    # their ranges (bbdrop.gates.settings); a method with settings of its own sets it.
    Settings: type[GateSettings] = GateSettings
    # True for a gate whose test-time mask depends on the input (DBB): its values
    # cannot be folded into the weights, only the units it prunes for every input;
    # the rest stays as its to_module().
    input_dependent: bool = False
    # True for a gate that overrides after_step: the trainer calls it on these only.
    steps_after_optimiser: bool = False
    # True for a gate whose values come from the layer it is bound to (per-weight
    # state, weight-group norms): it works on a layer only, not as a module of its own.
    needs_bound_layer: bool = False
    # True for a gate whose training forward pass draws no noise (a weight penalty).
    deterministic_training: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.after_step is not Gate.after_step and not cls.steps_after_optimiser:
            raise TypeError(
                f"{cls.__qualname__} overrides after_step but does not declare "
                "steps_after_optimiser = True, so the trainer would not call it"
            )

    def __init__(self, num_units: int, kl_scale: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
            raise ValueError(f"num_units must be a positive int, got {num_units!r}")
        validate.non_negative("kl_scale", kl_scale)
        self.num_units = num_units
        self.kl_scale = float(kl_scale)
        # When True, eval mode draws masks from the posterior instead of using
        # the deterministic test-time values (Monte-Carlo predictive).
        self.mc_sampling = False
        # Units removed for good by prune_ (part of the learned state).
        self.register_buffer("static_keep", torch.ones(num_units, dtype=torch.bool))
        # (batch dimension, unit dimension) of the layer's input and output; the gate
        # itself computes on (N, K, ...). Set by gate_layer_.
        self.layout: tuple[int, int] = (0, 1)
        # Features per unit, consecutive on the layer's last dimension: an attention
        # head's (bbdrop.heads); 1 for a unit that is one feature or channel.
        self.unit_size = 1
        # The attention whose heads the units are (a bbdrop.AttentionHeads), or None.
        self.heads: Any = None
        # A gate of a coupled group (bbdrop.placement) multiplies the outputs of several
        # modules: its own layer's, then those of ``shared_with`` (plain references, set
        # by attach_gates_), with the mask its layer drew in the same forward pass.
        # ``group_root`` names a layer of the group, from which compact() rebuilds it.
        self.shared_with: list[nn.Module] = []
        self.group_root: str | None = None
        self._drawn: Tensor | None = None
        self._uses_left = 0

    # -- the protocol -------------------------------------------------------------
    @abstractmethod
    def mask(self, x: Tensor) -> Tensor:
        """The mask for input ``x`` (N, K, ...): shape (K,) or (N, K), applied over
        dimension 1."""

    @abstractmethod
    def regularizer(self, layer: nn.Module) -> Tensor:
        """The method's term of the objective (unscaled), a scalar tensor.

        ``layer`` is the gated layer, for methods whose penalty is over its weights.
        """

    @abstractmethod
    def gate_values(self) -> Tensor:
        """Deterministic test-time value per unit, shape (K,); zero for pruned units
        (those removed by :meth:`prune_` included)."""

    def keep_mask(self) -> Tensor:
        """Boolean (K,): the units that survive pruning (removed ones never do)."""
        with torch.no_grad():
            return (self.gate_values() != 0) & self.static_keep

    def keep_scores(self) -> Tensor:
        """(K,): how strongly the method keeps each unit, the quantity its own pruning
        rule thresholds (higher keeps longer), to rank units across gates when a
        budget removes more (:func:`bbdrop.budget.settle_`); by default the test-time
        :meth:`gate_values`. Methods whose rule reads another quantity override it."""
        with torch.no_grad():
            return self.gate_values().abs()

    def num_kept(self) -> int:
        """How many units survive pruning."""
        return int(self.keep_mask().sum())

    @torch.no_grad()
    def prune_(self, keep: Tensor) -> None:
        """Remove for good the units where ``keep`` is False (e.g. the paper's
        pre-pruning: units that no training example switches on). A test-time
        operation: the training forward pass does not look at it."""
        if keep.shape != (self.num_units,) or keep.dtype != torch.bool:
            raise ValueError(
                f"keep must be a bool tensor of shape ({self.num_units},), got "
                f"{keep.dtype} {tuple(keep.shape)}"
            )
        self.static_keep &= keep.to(self.static_keep.device)

    def active_units(self) -> float | None:
        """Average units switched on per example evaluated since :meth:`reset_active_units`,
        for input-dependent gates; None for a static gate (every kept unit is on)."""
        return None

    def reset_active_units(self) -> None:
        """Start the average of :meth:`active_units` afresh (nothing to do for static gates)."""

    def after_step(self, lr: float, num_train: int) -> None:
        """Called by the trainer after every optimiser step, with the weights' current
        learning rate and the number of training examples, on a gate whose class sets
        ``steps_after_optimiser``: a method with a proximal step (group
        soft-thresholding) applies it here. Nothing by default."""

    def to_module(self, units: list[int]) -> TestTimeMask | None:
        """The gate's test-time computation on its units ``units`` (indices, increasing)
        as a plain module, for an input-dependent gate: what :func:`bbdrop.compact`
        puts beside the layer, whose weights hold the units the gate prunes for every
        input. None for a static gate, whose values fold into the weights (:meth:`fold`)."""
        return None

    def untrained_reason(self) -> str | None:
        """Why the gate cannot be compacted yet, the end of a sentence that begins with
        the gate's method and name (e.g. "has no running statistics ... train it"), or
        None when it can: :func:`bbdrop.compact` refuses the network with it."""
        return None

    def runtime_cost(
        self, num_units: float, spatial: tuple[int, int] | None
    ) -> tuple[float, float]:
        """Extra (FLOPs, memory values) per example that the gate costs at test time
        over ``num_units`` kept units; ``spatial`` is (H, W) of a convolution's
        output, None on a dense layer's input. A static gate costs nothing: its
        values fold into the neighbouring weights."""
        return 0.0, 0.0

    @torch.no_grad()
    def fold(self, layer: nn.Module, side: str) -> tuple[Tensor, Tensor | None]:
        """``layer``'s weight and bias with the test-time :meth:`gate_values` multiplied
        in: weight columns (input channels) for a gate on the layer's input, weight
        rows (output channels) and the bias for one on its output. A plain layer
        with these computes what the gated layer computes in evaluation, for a
        static gate; a method whose evaluation differs (pruned weights) overrides it.
        ``layer`` is a ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (groups=1 on the input side)."""
        return scale_units(layer, side, self.per_feature(self.gate_values()))

    @classmethod
    def from_gate(cls, gate: Gate, **kwargs: Any) -> Gate:
        """A gate of this method that starts from a trained ``gate`` of another.

        Methods that support such a start (DBB from BB) override this.
        """
        raise ValueError(
            f"{cls.__name__} cannot be built from another gate; attach it to an ungated "
            "model with attach_gates_"
        )

    def bind(self, layer: nn.Module, side: str) -> None:
        """Called once by :func:`bbdrop.gate_layer_` when this gate is put on ``layer``
        (on its ``"input"`` or ``"output"``). The base class keeps a reference to
        the layer, outside the module tree (it is not saved twice); methods that
        need the layer's shape or weights override this and call ``super().bind``."""
        self._bound = (layer, side)  # a tuple: nn.Module does not register it

    def bound_layer(self) -> nn.Module:
        """The layer this gate was bound to; ValueError for a gate on no layer."""
        return self._bound_to()[0]

    def bound_side(self) -> str:
        """The side of its layer this gate was bound to, ``"input"`` or ``"output"``;
        ValueError for a gate on no layer."""
        return self._bound_to()[1]

    def _bound_to(self) -> tuple[nn.Module, str]:
        bound = getattr(self, "_bound", None)
        if bound is None:
            raise ValueError(
                f"this {type(self).__name__} is on no layer; attach it with "
                "bbdrop.attach_gates_(model, name)"
            )
        return bound

    # -- shared mechanics -------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.apply_mask(x, self.mask(x))

    def layer_forward(self, layer: nn.Module, x: Tensor, side: str) -> Tensor:
        """``layer`` applied to ``x`` (in the layer's layout) with this gate on its input
        or output (``side``), without the layer's hooks: what the hooks of a gated layer
        compute. A method that owns its layer's computation overrides it."""
        if side == "input":
            return layer.forward(self.on_layer(x))
        return self.on_layer(layer.forward(x))

    def canonical(self, x: Tensor) -> Tensor:
        """``x`` in the layer's layout (:attr:`layout`) as the gate sees it: the batch
        first, the units second, (N, K, ...); a view."""
        return units_second(x, self.layout, self.unit_size)

    def on_layer(self, x: Tensor, *, again: bool = False) -> Tensor:
        """The gate applied to ``x`` in its layer's layout (what the layer's hooks call).

        A gate shared by a group's modules draws its mask at its own layer and applies
        the same mask (``again=True``) at the others in that forward pass, so that a
        channel the group carries is multiplied by one value everywhere."""
        layout, size = self.layout, self.unit_size
        xc = units_second(x, layout, size)
        if not self.shared_with:
            return from_units_second(self.zero_removed(self(xc)), layout, size)
        m = self._drawn
        if not again or m is None or (m.dim() == 2 and m.shape[0] != xc.shape[0]):
            self.check_input(xc)
            m = self.mask(xc)
            self._drawn, self._uses_left = (m, len(self.shared_with)) if not again else (None, 0)
            self.note_mask(m, xc.shape[0])
        else:
            self._uses_left -= 1
            if self._uses_left <= 0:  # the group's last module: nothing kept past the pass
                self._drawn = None
        return from_units_second(self.zero_removed(self.apply_mask(xc, m)), layout, size)

    def zero_removed(self, y: Tensor, layout: tuple[int, int] | None = None) -> Tensor:
        """``y`` with the units removed for good (:meth:`prune_`) at zero, in training too:
        a method's training noise does not know of them, and a unit removed while the
        network still trains (a FLOP budget's removals) must not carry what the weights
        learn. ``y`` is (N, K, ...), or in ``layout`` (the layer's, :attr:`layout`)."""
        keep = self.static_keep
        # eager: skip the product when nothing was removed; compiled: always take it (y
        # times ones is y exactly), since reading the flag on the host breaks the graph
        if not _compiling() and bool(keep.all()):
            return y
        if layout is None:
            return apply_units(y, keep.to(y.dtype))
        return self.scale_on_layer(y, keep.to(y.dtype))

    def note_mask(self, m: Tensor, n: int) -> None:
        """Called with the mask a gate shared by a group drew for ``n`` examples, at its
        own layer: an input-dependent gate counts its active units here, as its
        forward pass does. Nothing by default."""

    def scale_on_layer(self, x: Tensor, values: Tensor) -> Tensor:
        """``x``, in its layer's layout, times ``values`` (K,) or (N, K) over its units."""
        layout, size = self.layout, self.unit_size
        return from_units_second(apply_units(units_second(x, layout, size), values), layout, size)

    def per_feature(self, values: Tensor) -> Tensor:
        """``values`` over the units (K,) as values over the layer's features: each
        repeated :attr:`unit_size` times (an attention head's features)."""
        return values if self.unit_size == 1 else values.repeat_interleave(self.unit_size)

    # x (N, K, ...) times a mask (K,) or (N, K), shared over the positions
    apply_mask = staticmethod(apply_units)

    def check_input(self, x: Tensor) -> None:
        """ValueError unless ``x`` is floating point, (N, K, ...) with K == num_units."""
        self.check_tensor(x)
        if x.shape[1] != self.num_units:
            raise ValueError(
                f"{type(self).__name__} has {self.num_units} units but the input has "
                f"{x.shape[1]} along dimension 1 (shape {tuple(x.shape)})"
            )

    def check_tensor(self, x: Tensor) -> None:
        """ValueError unless ``x`` is floating point of the gate's dtype and of rank 2 or
        more (whatever its width: a layer's input that the gate does not see directly)."""
        if not x.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expects floating-point input, got {x.dtype}; "
                "convert it first, e.g. x.float()"
            )
        own = next((p.dtype for p in self.parameters()), x.dtype)
        if x.dtype != own:
            raise ValueError(
                f"{type(self).__name__} has {own} parameters but the input is {x.dtype}; "
                f"convert one to the other, e.g. x.to({own}) or model.to({x.dtype})"
            )
        if x.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expects a batch of inputs, (N, K, ...), got rank "
                f"{x.dim()} with shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, kl_scale={self.kl_scale}"


@torch.no_grad()
def scale_units(layer: nn.Module, side: str, values: Tensor) -> tuple[Tensor, Tensor | None]:
    """``layer``'s weight and bias with unit k multiplied by ``values[k]``: weight columns
    (input channels) for ``side="input"``, weight rows (output channels) and the bias
    for ``"output"``. ``layer``: ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (groups=1 on the input
    side)."""
    weight, bias = layer.weight.detach(), layer.bias
    g = values.detach().to(weight.dtype)
    bias = None if bias is None else bias.detach()
    if side == "input":
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(f"cannot fold a gate into the input of a grouped {layer}")
        return weight * g.reshape(1, -1, *[1] * (weight.dim() - 2)), bias
    weight = weight * g.reshape(-1, *[1] * (weight.dim() - 1))
    return weight, None if bias is None else bias * g
