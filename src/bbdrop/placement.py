"""Where gates go on a network a user brings: one gate per coupled group of channels,
at the points where removing a unit is exact.

Torch-Pruning's dependency graph (DepGraph, Fang et al., CVPR 2023) finds the sets of
channels that must go together: the hidden units between two layers, the channels of
a residual stream (every block adds into them), the channels a depthwise convolution
carries through, those a concatenation joins. :func:`coupled_groups` turns each set
into a :class:`GroupPlan`: the modules whose outputs write the channels (a convolution
followed by batch norm writes them through the norm, so the point is the norm's
output), which then multiply them by one gate. A unit the gate switches off is then
exactly zero wherever the channel is read, so that :func:`bbdrop.compact` removes it
with nothing to fold or correct.

A group gets no gate, with the reason recorded (:attr:`Placement.skipped`), when
removing a unit would not be exact or would reach outside the network:

* a normalisation over the channels lies on it (``nn.LayerNorm``: a transformer's
  residual width), or a module with parameters other than a linear layer, a
  convolution or batch norm (an ``nn.MultiheadAttention``'s model width: its heads
  take a gate instead, :mod:`bbdrop.heads`);
* the channels meet in an attention product (matrix products between activations,
  softmax): heads, whose count the user's code fixes (``attach_gates_(heads=...)``
  gates them whole, :mod:`bbdrop.heads`);
* the channels are the network's output, or are read from its input without passing
  through a gated point (a residual stream that starts at the input);
* a unit switched off would not be zero where it is read (an activation that maps 0
  elsewhere, such as a sigmoid): checked on the example batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bbdrop.heads import fused_attentions, unnested

__all__ = ["GroupPlan", "Placement", "coupled_groups"]

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# The operations between layers that carry a channel through unchanged in index (or
# gather channels by a fixed rule: flatten, concatenation, split), so that a zero
# channel stays zero: Torch-Pruning names them by their autograd node.
_CARRIERS = (
    "Add", "Sub", "Mul", "Relu", "Gelu", "Silu", "Tanh", "Hardtanh", "Hardswish", "Elu",
    "LeakyRelu", "Mish", "Clone", "Mean", "Sum", "MaxPool", "AvgPool", "AdaptiveAvgPool",
    "AdaptiveMaxPool", "Addmm", "Mm", "T", "View", "Reshape", "Unsafe", "Flatten", "Cat",
    "Split", "Dropout", "NativeDropout", "Convolution", "NativeBatchNorm", "Squeeze",
)  # fmt: skip


_FUSED_ATTENTION = (
    "an nn.MultiheadAttention lies on it: its model width (embed_dim) cannot be removed, "
    "its head width being that width over its head count (its heads take a gate: "
    "attach_gates_ gives each nn.MultiheadAttention one, bbdrop.heads)"
)
_HEADS = "attention heads: gate them whole with attach_gates_(heads=[bbdrop.AttentionHeads(...)])"


@dataclass(frozen=True)
class GroupPlan:
    """One coupled group of ``width`` channels and the modules whose outputs write them
    (``points``, qualified names, in the order they run); ``root`` is a layer of the
    group from which its pruning group is rebuilt at compaction."""

    points: tuple[str, ...]
    width: int
    root: str
    layers: tuple[str, ...] = ()  # the linear layers and convolutions that write them


@dataclass
class Placement:
    """The gateable groups of a network (:class:`GroupPlan`) and, by the first layer of
    each group that is not gateable, why (:func:`coupled_groups`)."""

    groups: list[GroupPlan] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def coupled_groups(model: nn.Module, example: Tensor) -> Placement:
    """The coupled groups of ``model`` where a gate can go (module docstring), found by
    tracing it on ``example`` (a batch of at least two inputs). The model's modes and
    buffers are left as they were."""
    with unnested(model):  # the traces read plain tensors
        return _coupled_groups(model, example)


def _coupled_groups(model: nn.Module, example: Tensor) -> Placement:
    import torch_pruning as tp

    from bbdrop.attach import side_effect_free

    names = {m: n for n, m in model.named_modules()}
    with side_effect_free(model), torch.enable_grad():  # Torch-Pruning traces autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    order = _execution_order(model, example)
    last = _last_layer(model, example)
    plan = Placement()
    readers: dict[str, list[tuple[nn.Module, Tensor]]] = {}
    for group in graph.get_all_groups(root_module_types=list(LAYERS)):
        items = list(group)
        root = items[0].dep.target.module
        if root not in names:
            continue
        reason = _why_not(graph, items, last)
        if reason is None:
            points = _final_producers(graph, items)
            if not points:
                reason = "no layer writes these channels"
        if reason is not None:
            plan.skipped[names[root]] = reason
            continue
        points.sort(key=lambda m: order.get(m, len(order)))
        layers = sorted(_writers(graph, items, LAYERS), key=lambda m: order.get(m, len(order)))
        width = len(items[0].idxs)
        plan.groups.append(GroupPlan(tuple(names[m] for m in points), width, names[root],
                                     tuple(names[m] for m in layers)))  # fmt: skip
        readers[names[root]] = [
            (item.dep.target.module, torch.as_tensor(list(item.idxs), dtype=torch.long))
            for item in items
            if isinstance(item.dep.target.module, LAYERS)
            and graph.is_in_channel_pruning_fn(item.dep.handler)
        ]
    _drop_inexact(model, example, plan, readers)
    plan.skipped.update(fused_attentions(model)[1])  # heads that cannot take a gate
    return plan


def _why_not(graph: object, items: list, last: nn.Module | None) -> str | None:
    """Why a group cannot take a gate (module docstring), or None."""
    import torch_pruning as tp

    for item in items:
        module = item.dep.target.module
        if isinstance(module, tp.ops._OutputOp):
            return "its channels are the network's output"
        if module is last and graph.is_out_channel_pruning_fn(item.dep.handler):
            return "its channels are the network's output"
        if isinstance(module, nn.Module) and not _is_op(module):
            own = next(module.parameters(recurse=False), None) is not None
            if isinstance(module, nn.MultiheadAttention):
                return _FUSED_ATTENTION
            if own and not isinstance(module, LAYERS + NORMS):
                return (
                    f"a {type(module).__name__} lies on it, whose channels cannot be removed "
                    "exactly (a normalisation over them, or a module with its own width)"
                )
            if isinstance(module, NORMS) and not module.affine:
                return f"a {type(module).__name__} without affine parameters lies on it"
            continue
        op = _op_name(module)
        kind = type(module).__name__
        if kind in ("_ElementWiseOp",) and op and not op.startswith(_CARRIERS):
            return f"its channels meet in {op.removesuffix('Backward0')} ({_HEADS}?)"
        if kind in ("_ExpandOp", "_UnbindOp", "_SliceOp"):
            return f"its channels pass a {kind.strip('_')} ({_HEADS}?)"
    return None


def _is_op(module: object) -> bool:
    """Whether ``module`` is Torch-Pruning's stand-in for an operation without parameters."""
    return type(module).__module__.startswith("torch_pruning")


def _op_name(op: object) -> str:
    """The autograd node's name of a Torch-Pruning operation (e.g. "AddBackward0")."""
    grad_fn = getattr(op, "_grad_fn", None)
    name = getattr(grad_fn, "name", None)
    return name() if callable(name) else ""


def _final_producers(graph: object, items: list) -> list[nn.Module]:
    """The modules of the group that write its channels last: a layer or norm whose
    output is not normalised next by a batch norm of the same group."""
    writers = _writers(graph, items, LAYERS + NORMS)
    final = []
    for module in writers:
        node = graph.module2node[module]
        if not any(out.module in writers and isinstance(out.module, NORMS) for out in node.outputs):
            final.append(module)
    return final


def _writers(graph: object, items: list, kinds: tuple[type, ...]) -> set[nn.Module]:
    """The modules of ``kinds`` in the group that write its channels (their outputs)."""
    return {
        item.dep.target.module
        for item in items
        if isinstance(item.dep.target.module, kinds)
        and graph.is_out_channel_pruning_fn(item.dep.handler)
    }


def _execution_order(model: nn.Module, example: Tensor) -> dict[nn.Module, int]:
    """The order in which ``model``'s modules finish on ``example``."""
    from bbdrop.attach import side_effect_free

    order: dict[nn.Module, int] = {}

    def done(m: nn.Module, args: tuple, out: object) -> None:
        order.setdefault(m, len(order))

    hooks = [m.register_forward_hook(done) for m in model.modules()]
    try:
        with side_effect_free(model):
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return order


def _last_layer(model: nn.Module, example: Tensor) -> nn.Module | None:
    """The module whose output the network returns, if one does."""
    from bbdrop.attach import side_effect_free

    outputs: dict[int, nn.Module] = {}

    def done(m: nn.Module, args: tuple, out: object) -> None:
        outputs[id(out)] = m

    hooks = [m.register_forward_hook(done) for m in model.modules() if m is not model]
    try:
        with side_effect_free(model):
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    return outputs.get(id(out))


def _drop_inexact(
    model: nn.Module,
    example: Tensor,
    plan: Placement,
    readers: dict[str, list[tuple[nn.Module, Tensor]]],
) -> None:
    """Move to ``plan.skipped`` the groups whose channels, with every point of every
    group set to zero, are not zero where a layer reads them: an input reaches them
    without a gate (a residual stream that starts at the network's input), or an
    activation maps zero elsewhere."""
    from bbdrop.attach import side_effect_free

    modules = dict(model.named_modules())
    points = {modules[p] for g in plan.groups for p in g.points}
    seen: dict[nn.Module, Tensor] = {}

    def zero(m: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return torch.zeros_like(out)

    def record(m: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if isinstance(m, nn.Linear):  # features last
            seen[m] = x.reshape(-1, x.shape[-1]).abs().amax(0)
        else:  # channels second
            seen[m] = x.transpose(0, 1).reshape(x.shape[1], -1).abs().amax(1)

    hooks = [m.register_forward_hook(zero) for m in points]
    hooks += [m.register_forward_pre_hook(record)
              for rs in readers.values() for m, _ in rs]  # fmt: skip
    try:
        with side_effect_free(model):
            model(example)
    finally:
        for h in hooks:
            h.remove()
    kept = []
    for g in plan.groups:
        stray = [m for m, idxs in readers[g.root] if m in seen and bool(seen[m][idxs].ne(0).any())]
        if stray:
            plan.skipped[g.root] = (
                "a unit switched off would not be zero where it is read (the channels come "
                "from the network's input too, or an activation maps zero elsewhere)"
            )
        else:
            kept.append(g)
    plan.groups[:] = kept
