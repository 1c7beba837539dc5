"""Physical pruning: from a gated network to a smaller plain one (docs/compact.md).

:func:`compact` turns a trained gated network into the network it stands for at
test time. Each gate's test-time values are folded into its layer's weights
(:meth:`bbdrop.Gate.fold`), and each unit that nothing downstream can see is
removed from the layer that produces it, the layers that consume it and the
batch norms in between. The coupling of channels (a flatten between a
convolution and a dense layer, residual additions, concatenations) comes from
Torch-Pruning's dependency graph (DepGraph, Fang et al., CVPR 2023): a
channel is removed together with everything that carries it, or not at all.

A channel is removed exactly when

* every layer that consumes it gives it zero weight (its gates there are zero), or
* every layer that produces it emits zero for it (its gates there are zero). The
  layers in between (batch norm, ReLU, pooling) may turn that zero into a
  constant; the constant's contribution is folded into each consumer's bias.
  That is exact for a dense consumer and for a convolution without padding; a
  padded convolution sees the constant only inside the image, not at the
  borders, so there the fold is inexact. :func:`compact` measures the output
  difference on ``example`` and warns (:class:`CompactWarning`) with it.

What cannot be removed as a whole channel, an input feature of a dense layer
whose gate is zero while the convolution channel it comes from stays (or a
pixel of the network's input), is dropped by gathering the kept features in
front of the layer (:class:`SelectFeatures`), which costs a copy of the kept
features and saves their share of the product.

DBB: the units its BB part prunes (and the pre-pruned ones) are removed as
above; the input-dependent part stays, as a :class:`DependentMask` on the kept
units (a plain module with DBB's test-time computation, nothing to sample).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbdrop.attach import GatedLayer, gated_layers, mc_sampling, side_effect_free
from bbdrop.gates.base import Gate, scale_units

__all__ = [
    "CompactWarning",
    "DependentMask",
    "PrunedLayer",
    "SelectFeatures",
    "compact",
    "inference_parameters",
    "without_gates",
]

# Layers whose channels compact() removes; between them, any layer without
# parameters that Torch-Pruning traces (activations, pooling, flatten, add, cat).
_LAYERS = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# The largest spread of a channel over the example batch (and positions) that still
# counts as a constant, relative to the channel's magnitude.
_CONSTANT_RTOL = 1e-6
# The output difference to the gated network (relative to the output's magnitude, if
# above 1) beyond which compact() warns where removal is inexact by nature; where every
# removal is exact, 100 times it is a bbdrop bug (float32 rounding is ~1e-7).
TOLERANCE = 1e-5


class CompactWarning(UserWarning):
    """The compacted network differs from the gated one by more than rounding, at a
    place where removal is inexact by nature (a constant channel into a padded
    convolution); the message gives the measured difference."""


class SelectFeatures(nn.Module):
    """``x[:, index]``: the features (dimension 1) a pruned layer still reads.

    Args:
        index: the kept features, int64, increasing.
        num_features: the width of the input it selects from (for checks and export).
    """

    def __init__(self, index: Tensor, num_features: int) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.int64))
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.num_features}"


class PrunedLayer(nn.Sequential):
    """A compacted layer with what runs beside it: the :class:`SelectFeatures` in front
    of a layer that reads some of its input, a :class:`DependentMask` before or after
    it. A Sequential, told apart so that a saved network can be rebuilt."""


class DependentMask(nn.Module):
    """DBB's test-time mask as a plain module, on the units a compacted network kept:
    ``x * m`` with ``m = z 1[z > t]``, ``z = pi phi(x)``, ``phi = clamp(scale (h - mu) /
    sigma + beta, eps, 1 - eps)``, ``h`` the input (average-pooled over positions for
    a convolution's channels). Computed as :class:`bbdrop.DependentBetaBernoulliGate`
    computes it in evaluation, operation for operation, so the results are the same
    bit for bit; ``pi`` is its E_q[pi] after the BB threshold, ``mul`` its
    ``scale / sigma``."""

    def __init__(
        self, pi: Tensor, mean: Tensor, mul: Tensor, shift: Tensor, eps: float, threshold: float
    ) -> None:
        super().__init__()
        for name, value in (("pi", pi), ("mean", mean), ("mul", mul), ("shift", shift)):
            self.register_buffer(name, value.detach().clone())
        self.eps = float(eps)
        self.threshold = float(threshold)

    @classmethod
    @torch.no_grad()
    def from_gate(cls, gate: Gate, units: list[int]) -> DependentMask:
        """The mask of a trained DBB ``gate`` on its units ``units`` (indices)."""
        index = torch.as_tensor(units, dtype=torch.long, device=gate.shift.device)
        mul = torch.rsqrt(gate.running_var + gate.norm_eps) * gate.scale
        return cls(gate.gate_values()[index], gate.running_mean[index], mul[index],
                   gate.shift[index], gate.phi_eps, gate.threshold)  # fmt: skip

    def mask(self, x: Tensor) -> Tensor:
        """(N, K): the mask of each example."""
        h = x.mean(dim=(2, 3)) if x.dim() == 4 else x
        phi = torch.addcmul(self.shift, h - self.mean, self.mul).clamp_(self.eps, 1.0 - self.eps)
        # in place, and one threshold in place of a comparison and a product: at batch 256
        # a third less time than out of place (benchmarks/inference.py), the same values
        return F.threshold(phi.mul_(self.pi), self.threshold, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        m = self.mask(x)
        return x * (m[..., None, None] if x.dim() == 4 else m)

    def extra_repr(self) -> str:
        return f"units={self.pi.numel()}, threshold={self.threshold}"


@dataclass
class _Stats:
    """A layer's input on the example batch, per input feature or channel (current
    coordinates): the mean and the spread (max - min) over examples and positions."""

    mean: Tensor
    spread: Tensor
    scale: Tensor
    size: tuple[int, ...]  # (H, W) of a convolution's input; () for a dense layer

    def drop(self, idxs: Iterable[int]) -> None:
        keep = torch.ones(self.mean.numel(), dtype=torch.bool)
        keep[list(idxs)] = False
        self.mean, self.spread, self.scale = self.mean[keep], self.spread[keep], self.scale[keep]


@dataclass
class _Tracked:
    """Original unit indices still present on one side of a layer that carries a
    dynamic (DBB) gate, so that the gate can be cut to the same units."""

    gate: Gate
    side: str
    alive: list[int] = field(default_factory=list)


@torch.no_grad()
def compact(model: nn.Module, example: Tensor, *, round_to: int = 1) -> nn.Module:
    """The smaller network that ``model`` (with bbdrop gates) computes in evaluation.

    Args:
        model: a network with gates (:func:`bbdrop.attach_gates_`), trained; it is
            not changed.
        example: an input batch of the model (a few examples suffice); it is traced
            to find which channels are coupled, and the result is checked on it.
        round_to: keep a multiple of this many units (channels) in each set of
            coupled layers, or all of them: a few pruned units stay, computing the
            zeros they compute in ``model``. Matrix products run faster at some
            widths than at others (docs/compact.md, "Widths").

    Returns:
        A copy of ``model`` in eval mode without static gates: each gated layer is a
        plain ``nn.Linear`` / ``nn.Conv2d`` of the kept widths (behind a
        :class:`SelectFeatures`, in a :class:`PrunedLayer`, where it reads a subset
        of its input), batch norms
        cut to the same channels. A DBB gate leaves a :class:`DependentMask` on its
        kept units, in a :class:`PrunedLayer` with the layer.

    Raises:
        ValueError: no gates; a gated layer that keeps no unit; a layer type whose
            channels cannot be removed exactly (named).
    """
    import torch_pruning as tp

    if isinstance(model, GatedLayer):
        raise ValueError(
            "compact() takes a network with gated layers inside it, not one gated layer: "
            "wrap it, e.g. compact(nn.Sequential(layer), example)[0]"
        )
    gates = list(gated_layers(model))
    if not gates:
        raise ValueError(
            "the model has no bbdrop gates: attach them with bbdrop.attach_gates_(model, "
            "method) and train it before compacting"
        )
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a whole number of units, 1 or more, got {round_to!r}")
    if example.dim() < 1 or len(example) < 2:
        raise ValueError(
            f"example must hold at least 2 inputs (got shape {tuple(example.shape)}): "
            "compact() tells constant channels from the others by comparing them"
        )
    for name, g in gates:
        if g.gate.input_dependent and not _has_statistics(g.gate):
            raise ValueError(
                f"DBB gate {name!r} has no running statistics (its mean and variance are still "
                "0 and 1): train the DBB stage before compacting"
            )
        if g.gate.num_kept() == 0:
            raise ValueError(
                f"gated layer {name!r} keeps no unit: the model is untrained or its training "
                "diverged (check the run's error), so there is no network to compact"
            )
    with side_effect_free(model) as m, mc_sampling(m, False):
        reference = m(example)
    if not isinstance(reference, Tensor):
        raise ValueError(
            f"compact() takes a network with one tensor as output, got {type(reference).__name__}"
        )

    net = copy.deepcopy(model).eval()
    input_gated: list[nn.Module] = []
    tracked: dict[nn.Module, _Tracked] = {}
    for name, g in list(gated_layers(net)):
        plain = _folded_layer(g)
        set_submodule(net, name, plain)
        if g.gate.input_dependent:  # kept as a gate on the kept units
            units = g.layer.weight.shape[1 if g.side == "input" else 0]
            tracked[plain] = _Tracked(g.gate, g.side, list(range(units)))
        if g.side == "input":
            input_gated.append(plain)

    stats, last = _input_stats(net, example)
    masked_inputs = {m for m, t in tracked.items() if t.side == "input"}
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=example)
    corrections: dict[nn.Module, Tensor] = {}  # what a padded convolution's borders miss
    names = {m: n for n, m in net.named_modules()}
    done: set[nn.Module] = set()
    for root in [m for m in net.modules() if type(m) in _LAYERS and m in graph.module2node]:
        if root in done:
            continue
        pruner = graph.get_pruner_of_module(root)
        width = pruner.get_out_channels(root)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, list(range(width)))
        items = list(group)
        for item in items:
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                done.add(item.dep.target.module)
        if _reaches_output(items, last, graph):
            continue  # removing a unit would change the network's output
        removable = _removable(graph, items, stats, width, masked_inputs)
        kept = width - len(removable)
        removable = removable[: width - min(width, -(-kept // round_to) * round_to)]
        if not removable:
            continue
        for item in items:
            _check_supported(item.dep.target.module, names)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, removable)
        for item in group:
            module, idxs = item.dep.target.module, list(item.idxs)
            if type(module) in _LAYERS and graph.is_in_channel_pruning_fn(item.dep.handler):
                border = _fold_constant_inputs(module, idxs, stats[module])
                if border is not None:
                    corrections[module] = corrections.get(module, 0) + border
                stats[module].drop(idxs)
            if module in corrections and graph.is_out_channel_pruning_fn(item.dep.handler):
                keep = torch.ones(corrections[module].shape[1], dtype=torch.bool)
                keep[idxs] = False
                corrections[module] = corrections[module][:, keep.to(corrections[module].device)]
            if module in tracked:
                side = "output" if graph.is_out_channel_pruning_fn(item.dep.handler) else "input"
                if side == tracked[module].side:
                    _drop(tracked[module].alive, idxs)
        group.prune()

    for layer in input_gated:
        _select_read_features(net, names[layer], layer, tracked.get(layer), round_to)
    for layer, t in tracked.items():
        _regate(net, names[layer], layer, t)

    tol = TOLERANCE * max(1.0, float(reference.abs().max()))
    # Every removal, the padded convolutions' borders put right: must be exact.
    hooks = [m.register_forward_hook(lambda _m, _a, out, c=c: out + c.to(out.dtype))
             for m, c in corrections.items()]  # fmt: skip
    try:
        with side_effect_free(net):
            exact = float((net(example) - reference).abs().max())
    finally:
        for h in hooks:
            h.remove()
    diff = exact
    if corrections:  # the network as it is, without the borders put right
        with side_effect_free(net):
            diff = float((net(example) - reference).abs().max())
    if exact > 100 * tol:
        raise RuntimeError(
            f"the compacted network differs from the gated one by {exact:.3g}: a removal was "
            "not exact (is there an operation that mixes channels, such as a softmax or a "
            "normalisation over them, on the path of a gated unit?). Please report it to "
            "bbdrop with the model"
        )
    if diff > tol:
        layers = ", ".join(sorted(names[m] for m in corrections))
        warnings.warn(
            f"the compacted network differs from the gated one by up to {diff:.3g} on the "
            f"example batch: constant channels (a gate before batch norm) feed the padded "
            f"convolution(s) {layers}, whose borders see zeros instead",
            CompactWarning,
            stacklevel=3,  # the caller of compact(), past torch.no_grad's wrapper
        )
    return net


def inference_parameters(model: nn.Module) -> int:
    """The values a compacted network computes with: its parameters and the values of
    its DBB masks (buffers), not the indices of its gathers."""
    masks = [m for m in model.modules() if isinstance(m, DependentMask)]
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for m in masks for b in m.buffers()
    )


def without_gates(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every gated layer replaced by its plain layer, unchanged:
    the dense network the gates sit on, in eval mode."""
    net = copy.deepcopy(model).eval()
    for name, g in list(gated_layers(net)):
        set_submodule(net, name, g.layer)
    return net


def _has_statistics(gate: Gate) -> bool:
    """Whether a DBB gate's running mean and variance moved from their initial 0 and 1."""
    return bool(gate.running_mean.ne(0).any() or gate.running_var.ne(1).any())


def _folded_layer(g: GatedLayer) -> nn.Module:
    """A copy of ``g``'s layer with the gate's test-time values folded in; for a dynamic
    gate only its static part (the units it prunes for every input)."""
    plain = copy.deepcopy(g.layer)
    if not g.gate.input_dependent:
        weight, bias = g.gate.fold(g.layer, g.side)
    else:
        weight, bias = scale_units(g.layer, g.side, g.gate.keep_mask())
    plain.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().clone())
    return plain


def set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` (dotted) in ``net``, in place of what is there."""
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def _input_stats(
    net: nn.Module, example: Tensor
) -> tuple[dict[nn.Module, _Stats], nn.Module | None]:
    """:class:`_Stats` of the input of every Linear and Conv2d of ``net`` on ``example``,
    and the layer whose output the network returns (None if no layer's is)."""
    stats: dict[nn.Module, _Stats] = {}

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach()
        if isinstance(module, nn.Linear):  # features: the last dimension
            x = x.reshape(-1, x.shape[-1])
        dims = [0, *range(2, x.dim())]  # all but the features / channels
        stats[module] = _Stats(
            x.mean(dims).cpu(),
            (x.amax(dims) - x.amin(dims)).cpu(),
            x.abs().amax(dims).clamp_min(1.0).cpu(),
            tuple(x.shape[2:]),
        )

    outputs: dict[int, nn.Module] = {}

    def output(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        outputs[id(out)] = module

    layers = [m for m in net.modules() if type(m) in _LAYERS]
    hooks = [m.register_forward_pre_hook(record) for m in layers]
    hooks += [m.register_forward_hook(output) for m in layers]
    try:
        out = net(example)
    finally:
        for h in hooks:
            h.remove()
    return stats, outputs.get(id(out))


def _reaches_output(items: list, last: nn.Module | None, graph: object) -> bool:
    """Whether a group's channels are (coupled to) the network's output: a layer whose
    output is returned, or an operation Torch-Pruning marks as the output."""
    import torch_pruning as tp

    for item in items:
        module = item.dep.target.module
        if isinstance(module, tp.ops._OutputOp):
            return True
        if module is last and graph.is_out_channel_pruning_fn(item.dep.handler):
            return True
    return False


def _check_supported(module: object, names: dict[nn.Module, str]) -> None:
    """ValueError for a layer with parameters whose channels compact() cannot remove
    exactly (a norm over all channels, for instance)."""
    if not isinstance(module, nn.Module) or type(module) in _LAYERS + _NORMS:
        return
    if next(module.parameters(recurse=False), None) is None:
        return
    raise ValueError(
        f"layer {names.get(module, type(module).__name__)!r} ({type(module).__name__}) "
        "lies on the path of a gated layer's units; compact() removes units across "
        "Linear, Conv2d, BatchNorm1d/2d and layers without parameters (activations, "
        "pooling, flatten, add, cat) only"
    )


def _removable(
    graph: object,
    items: list,
    stats: dict[nn.Module, _Stats],
    width: int,
    masked_inputs: set[nn.Module],
) -> list[int]:
    """Root channels of a group that can go: all producers emit zero (and every
    consumer then sees a constant, which it can fold), or all consumers give them
    zero weight. A consumer behind a DBB mask on its input must see zero, not just a
    constant (the mask would scale the constant per example); a grouped convolution
    too (its weights are per group)."""
    produced = torch.ones(width, dtype=torch.bool)  # every producer emits zero
    ignored = torch.ones(width, dtype=torch.bool)  # every consumer gives it zero weight
    constant = torch.ones(width, dtype=torch.bool)  # every consumer sees a foldable value
    consumers = False
    for item in items:
        module, handler = item.dep.target.module, item.dep.handler
        if type(module) not in _LAYERS:
            continue
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        roots = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        w = module.weight.detach().cpu()
        if graph.is_out_channel_pruning_fn(handler):
            zero = w.flatten(1).eq(0).all(1)[idxs]
            if module.bias is not None:
                zero &= module.bias.detach().cpu()[idxs].eq(0)
            produced &= _all_per_root(zero, roots, width)
        elif graph.is_in_channel_pruning_fn(handler):
            consumers = True
            s = stats[module]
            grouped = getattr(module, "groups", 1) != 1
            if grouped:  # weight columns are per group: no zero-weight rule
                zero = torch.zeros(len(idxs), dtype=torch.bool)
            else:
                zero = w.transpose(0, 1).flatten(1).eq(0).all(1)[idxs]
            ignored &= _all_per_root(zero, roots, width)
            flat = s.spread[idxs] <= _CONSTANT_RTOL * s.scale[idxs]
            if grouped or module in masked_inputs:
                flat &= s.mean[idxs].eq(0)
            constant &= _all_per_root(flat | zero, roots, width)
    if not consumers:  # a unit nothing reads: left alone
        return []
    keep_out = ~(ignored | (produced & constant))
    return torch.nonzero(~keep_out).flatten().tolist()


def _all_per_root(flags: Tensor, roots: Tensor, width: int) -> Tensor:
    """(width,) bool: whether every flag whose root index is r holds, per r."""
    out = torch.ones(width, dtype=torch.bool)
    out[roots[~flags]] = False
    return out


def _fold_constant_inputs(module: nn.Module, idxs: list[int], s: _Stats) -> Tensor | None:
    """Add to ``module``'s bias what its inputs ``idxs`` (constants) contribute, before
    they are removed. Returns what that misses where it is inexact: at the borders of
    a zero-padded convolution, which sees the constant inside the image only (the
    exact contribution, position by position, minus the folded one); else None."""
    c = s.mean[idxs]
    if not c.ne(0).any():  # zeros (always so into a grouped convolution, see _removable)
        return None
    w = module.weight.detach()[:, idxs]
    c = c.to(w.device, w.dtype)
    if not w.ne(0).any():
        return None
    if isinstance(module, nn.Conv2d):
        flat = w.sum((2, 3)) @ c
    else:
        flat = w @ c
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    module.bias.add_(flat)
    padding = module.padding if isinstance(module, nn.Conv2d) else "valid"
    padded = module.padding_mode == "zeros" if isinstance(module, nn.Conv2d) else False
    padded &= padding == "same" or (not isinstance(padding, str) and any(p != 0 for p in padding))
    if not padded:
        return None  # inside the image everywhere (or a padding that repeats the constant)
    image = c.reshape(1, -1, 1, 1).expand(1, len(idxs), *s.size)
    exact = torch.nn.functional.conv2d(image, w, None, module.stride, module.padding,
                                       module.dilation)  # fmt: skip
    return exact - flat.reshape(1, -1, 1, 1)


def _drop(alive: list[int], idxs: list[int]) -> None:
    """Remove positions ``idxs`` (current coordinates) from ``alive``."""
    for i in sorted(idxs, reverse=True):
        del alive[i]


def _select_read_features(
    net: nn.Module, name: str, layer: nn.Module, tracked: _Tracked | None, round_to: int
) -> None:
    """Drop the input features ``layer`` gives zero weight (that stay because the
    channel they come from is read elsewhere, or because they are the network's
    input), gathering the rest in front of it: a multiple of ``round_to`` of them,
    or all (then nothing is gathered)."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return
    read = w.transpose(0, 1).flatten(1).ne(0).any(1)
    used = int(read.sum())
    extra = -(-used // round_to) * round_to - used
    if extra > 0:  # keep the first few unread features too
        read[torch.nonzero(~read).flatten()[:extra]] = True
    if bool(read.all()) or not bool(read.any()):
        return
    index = torch.nonzero(read).flatten()
    layer.weight = nn.Parameter(w[:, index].clone())
    if isinstance(layer, nn.Linear):
        layer.in_features = index.numel()
    else:
        layer.in_channels = index.numel()
    if tracked is not None and tracked.side == "input":
        tracked.alive = [tracked.alive[i] for i in index.tolist()]
    set_submodule(net, name, PrunedLayer(SelectFeatures(index.to(w.device), w.shape[1]), layer))


def _regate(net: nn.Module, name: str, layer: nn.Module, t: _Tracked) -> None:
    """Put ``t``'s input-dependent mask, on its alive units, beside ``layer`` (at
    ``name``, which may now be a Sequential whose last module is ``layer``)."""
    mask = DependentMask.from_gate(t.gate, t.alive)
    holder = net.get_submodule(name)
    if isinstance(holder, PrunedLayer):
        holder.insert(len(holder) - 1, mask)  # the gathered features, then the mask
    elif t.side == "input":
        set_submodule(net, name, PrunedLayer(mask, layer))
    else:
        set_submodule(net, name, PrunedLayer(layer, mask))
