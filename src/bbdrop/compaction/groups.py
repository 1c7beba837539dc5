"""The Torch-Pruning group walk: each set of coupled channels (DepGraph, Fang et al.,
CVPR 2023) is found from one of its layers, and the channels that nothing downstream
can see are removed from every layer that carries them, constants folded into the
consumers' biases first."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bbdrop.compaction.folding import Tracked
from bbdrop.compaction.stats import LAYERS, Stats, input_stats
from bbdrop.heads import AttentionHeads, remove_heads_

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# The largest spread of a channel over the example batch (and positions) that still
# counts as a constant, relative to the channel's magnitude.
_CONSTANT_RTOL = 1e-6


def remove_units(
    net: nn.Module,
    example: Tensor,
    tracked: dict[nn.Module, Tracked],
    names: dict[nn.Module, str],
    round_to: int,
) -> dict[nn.Module, Tensor]:
    """Remove, in place, the channels of ``net`` that nothing downstream can see, a
    group of coupled channels at a time (a multiple of ``round_to`` kept in each, or
    all), cutting ``tracked``'s units to match. Returns, per padded convolution fed a
    removed constant channel, what its borders miss (see :func:`_fold_constant_inputs`)."""
    import torch_pruning as tp

    stats, last = input_stats(net, example)
    masked_inputs = {m for m, t in tracked.items() if t.side == "input"}
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=example)
    corrections: dict[nn.Module, Tensor] = {}  # what a padded convolution's borders miss
    done: set[nn.Module] = set()
    for root in [m for m in net.modules() if type(m) in LAYERS and m in graph.module2node]:
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
        removable = _rounded(removable, width, round_to)
        if len(removable) == width:  # one stays, computing zeros: torch's layers need one
            removable = removable[1:]
        if not removable:
            continue
        for item in items:
            _check_supported(item.dep.target.module, names)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, removable)
        _prune_group(graph, group, stats, corrections, tracked)
    return corrections


def remove_group_units(
    net: nn.Module,
    example: Tensor,
    groups: dict[str, list[int]],
    tracked: dict[nn.Module, Tracked],
    round_to: int,
) -> None:
    """Remove, in place, the units that the gates of coupled groups switched off (their
    values are folded: the units are zero wherever they are read), from every layer of
    each group: ``groups`` maps the name of a group's root layer to the units to drop
    (a multiple of ``round_to`` kept, or all). A group whose every unit is off (a
    residual branch that learned to be zero) keeps one, which computes zeros: the
    layers of PyTorch need one channel, and the add the branch feeds stays."""
    if not any(groups.values()):
        return
    import torch_pruning as tp

    modules = dict(net.named_modules())
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=example)
    for root_name, drop in groups.items():
        root = modules[root_name]
        pruner = graph.get_pruner_of_module(root)
        width = pruner.get_out_channels(root)
        drop = _rounded(drop, width, round_to)
        if len(drop) == width:  # keep one unit, computing zeros: torch's layers need one
            drop = drop[1:]
        if not drop:
            continue
        group = graph.get_pruning_group(root, pruner.prune_out_channels, drop)
        for item in group:
            module = item.dep.target.module
            if module in tracked and graph.is_out_channel_pruning_fn(item.dep.handler):
                if tracked[module].side == "output":
                    _drop(tracked[module].alive, list(item.idxs))
        group.prune()


def remove_gated_heads(
    net: nn.Module, heads: list[tuple[AttentionHeads, Tensor]], tracked: dict[nn.Module, Tracked]
) -> None:
    """Remove, in place, the attention heads whose gates switched them off (each
    attention with the heads to keep: :func:`bbdrop.heads.remove_heads_`), cutting an
    input-dependent gate on the output projection to the heads that stay."""
    modules = dict(net.named_modules())
    for spec, keep in heads:
        t = tracked.get(modules[spec.o])
        # a mask that stays beside the projection needs the call that reaches it
        kept = remove_heads_(net, spec, keep, keep_module=t is None).tolist()
        if t is not None and len(kept) < len(t.alive):
            t.alive = [t.alive[i] for i in kept]


def _rounded(removable: list[int], width: int, round_to: int) -> list[int]:
    """The first of ``removable`` (of ``width`` channels) whose removal leaves a
    multiple of ``round_to`` channels, or all ``width`` of them."""
    kept = width - len(removable)
    return removable[: width - min(width, -(-kept // round_to) * round_to)]


def _prune_group(
    graph: object,
    group: object,
    stats: dict[nn.Module, Stats],
    corrections: dict[nn.Module, Tensor],
    tracked: dict[nn.Module, Tracked],
) -> None:
    """Remove ``group``'s channels: first fold the constants they carry into each
    consumer's bias and cut the bookkeeping (statistics, border corrections, DBB units)
    to the channels that stay, then prune."""
    for item in group:
        module, idxs = item.dep.target.module, list(item.idxs)
        if type(module) in LAYERS and graph.is_in_channel_pruning_fn(item.dep.handler):
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
    if not isinstance(module, nn.Module) or type(module) in LAYERS + _NORMS:
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
    stats: dict[nn.Module, Stats],
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
        if type(module) not in LAYERS:
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


def _fold_constant_inputs(module: nn.Module, idxs: list[int], s: Stats) -> Tensor | None:
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
    conv = not isinstance(module, nn.Linear)
    flat = (w.flatten(2).sum(2) if conv else w) @ c
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    module.bias.add_(flat)
    padding = module.padding if conv else "valid"
    padded = module.padding_mode == "zeros" if conv else False
    padded &= padding == "same" or (not isinstance(padding, str) and any(p != 0 for p in padding))
    if not padded:
        return None  # inside the image everywhere (or a padding that repeats the constant)
    ones = [1] * len(s.size)
    image = c.reshape(1, -1, *ones).expand(1, len(idxs), *s.size)
    exact = module._conv_forward(image, w, None)  # its stride, padding and dilation
    return exact - flat.reshape(1, -1, *ones)


def _drop(alive: list[int], idxs: list[int]) -> None:
    """Remove positions ``idxs`` (current coordinates) from ``alive``."""
    for i in sorted(idxs, reverse=True):
        del alive[i]
