"""Costs of any network, counted on its graph: what the network a user would deploy
computes, for every method (docs/method.md, "Costs of any network").

:func:`network_costs` compacts the gated network (:func:`bbdrop.compact`) and counts,
with PyTorch's ``FlopCounterMode``, the matrix-product and convolution FLOPs of one
example through it and through the dense network, and their parameters. For an
input-dependent gate (DBB) it adds the expected run-time cost of its group: the
layers that read the group's channels, found on the compacted network's dependency
graph (Torch-Pruning), skip the units the gate switches off, on average over the data
given, so their FLOPs scale with the fraction of the group's units switched on.
The paper's accounting (:func:`bbdrop.paper_costs`) stays for the paper's sequential
networks, labelled as such; this one holds for residual, depthwise and transformer
networks as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bbdrop.heads import PrunedMultiheadAttention

__all__ = ["GroupCost", "NetworkCosts", "network_costs"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class GroupCost:
    """One gate's group in the compacted network: its kept ``units``, the units switched
    on per example (``active``; None for a static gate), the FLOPs per example of the
    layers that read its channels, and those FLOPs when they skip the units that are
    off (``expected_flops``; the same for a static gate)."""

    name: str
    units: int
    active: float | None
    reader_flops: float
    expected_flops: float


@dataclass(frozen=True)
class NetworkCosts:
    """FLOPs (matrix products and convolutions, per example) and parameters of the dense
    network and of the compacted one; ``expected_flops``: the compacted network's
    FLOPs when the layers behind input-dependent gates skip the units switched off."""

    dense_flops: int
    dense_parameters: int
    flops: int
    parameters: int
    expected_flops: float
    groups: tuple[GroupCost, ...]

    @property
    def speedup(self) -> float:
        """Dense FLOPs over the compacted network's."""
        return self.dense_flops / max(self.flops, 1)

    @property
    def expected_speedup(self) -> float:
        """Dense FLOPs over the compacted network's with run-time skipping."""
        return self.dense_flops / max(self.expected_flops, 1.0)


@torch.no_grad()
def network_costs(
    model: nn.Module,
    example: Tensor,
    data: Tensor | None = None,
    *,
    compacted: nn.Module | None = None,
) -> NetworkCosts:
    """The costs of the gated ``model`` (:class:`NetworkCosts`).

    Args:
        model: a network with bbdrop gates, trained; it is not changed.
        example: a batch of its inputs (two or more), to compact and count with.
        data: the inputs over which an input-dependent gate's active units are
            averaged (default ``example``).
        compacted: ``bbdrop.compact(model, example)``, when made already.
    """
    from bbdrop.attach import active_units, gated_layers, reset_active_units, side_effect_free
    from bbdrop.compaction import compact, without_gates

    small = compact(model, example) if compacted is None else compacted
    one = example[:1]
    dense_flops, _ = _flops(without_gates(model), one)
    flops, per_layer = _flops(small, one)
    active: dict[str, float] = {}
    if any(layer.gate.input_dependent for _, layer in gated_layers(model)):
        with side_effect_free(model):  # the counters and modes come back as they were
            reset_active_units(model)
            model(example if data is None else data)
            active = active_units(model)
    groups = tuple(_group_cost(small, one, name, layer.gate, active.get(name), per_layer)
                   for name, layer in gated_layers(model))  # fmt: skip
    saved = sum(g.reader_flops - g.expected_flops for g in groups)
    return NetworkCosts(
        dense_flops=dense_flops,
        dense_parameters=sum(p.numel() for p in without_gates(model).parameters()),
        flops=flops,
        parameters=sum(p.numel() for p in small.parameters()),
        expected_flops=flops - saved,
        groups=groups,
    )


def _flops(net: nn.Module, x: Tensor) -> tuple[int, dict[nn.Module, int]]:
    """Total FLOPs of ``net`` on ``x``, and those of each linear layer and convolution."""
    counter = FlopCounterMode(display=False)
    fused = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # fused transformer kernels: uncounted
    # PyTorch's attention applies its out_proj in its fused call, not as a module: its
    # FLOPs, counted under the attention, are given to the projection from the tokens
    tokens: dict[nn.Module, int] = {}
    handles = [m.register_forward_hook(_count_tokens(tokens)) for m in net.modules()
               if isinstance(m, nn.MultiheadAttention)]  # fmt: skip
    try:
        with counter:
            net.eval()(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fused)
        for handle in handles:
            handle.remove()
    names = {name: m for name, m in net.named_modules() if isinstance(m, _LAYERS)}
    counts = counter.get_flop_counts()
    per_layer = {o: 2 * n * o.in_features * o.out_features for o, n in tokens.items()}
    for name, m in names.items():
        for key, ops in counts.items():  # FlopCounterMode's keys: "Global" and module paths
            if key.split(".", 1)[-1] == name or key == name:
                per_layer[m] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_layer


def _count_tokens(tokens: dict[nn.Module, int]) -> object:
    """A forward hook recording how many tokens an ``nn.MultiheadAttention`` whose
    ``out_proj`` is not called as a module projected (a pruned one calls it)."""

    def hook(attention: nn.Module, args: object, output: tuple[Tensor, object]) -> None:
        if not isinstance(attention, PrunedMultiheadAttention):
            o = attention.out_proj
            tokens[o] = tokens.get(o, 0) + output[0].numel() // o.out_features

    return hook


def _group_cost(
    small: nn.Module,
    x: Tensor,
    name: str,
    gate: nn.Module,
    active: float | None,
    per_layer: dict[nn.Module, int],
) -> GroupCost:
    """The cost of the layers of ``small`` that read the channels of gate ``name``."""
    module = small.get_submodule(name)
    kept = _kept_width(module, gate)
    readers = _readers(small, x, module, gate)
    reader_flops = float(sum(per_layer.get(m, 0) * share for m, share in readers))
    expected = reader_flops
    if active is not None and kept > 0:
        off = 1.0 - min(active, kept) / kept
        expected = reader_flops - off * reader_flops
    return GroupCost(name, kept, active, reader_flops, expected)


def _kept_width(module: nn.Module, gate: nn.Module) -> int:
    """The units the compacted ``module`` keeps on the gate's side (heads, for a gate on
    attention heads: :attr:`bbdrop.Gate.unit_size` features each)."""
    weight = module.weight
    if gate.bound_side() == "input":
        return int(weight.shape[1] if weight.dim() > 1 else weight.shape[0]) // gate.unit_size
    return int(weight.shape[0])


def _readers(
    small: nn.Module, x: Tensor, module: nn.Module, gate: nn.Module
) -> list[tuple[nn.Module, float]]:
    """The layers of ``small`` that read the channels gated at ``module`` and, for each,
    the share of its input they are (1 when it reads nothing else). For a gate on
    attention heads, the output projection alone: a head switched off for an example
    would also spare its q, k, v rows and attention products, which are not counted.
    (PyTorch's attention applies its output projection in its fused call: the
    projection's FLOPs are counted from the tokens it projected, :func:`_flops`.)"""
    if gate.bound_side() == "input":  # the layer itself reads them
        return [(module, 1.0)]
    import torch_pruning as tp

    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(small, example_inputs=x)
    pruner = graph.get_pruner_of_module(module)
    width = pruner.get_out_channels(module)
    group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(width)))
    readers = []
    for item in group:
        layer = item.dep.target.module
        if isinstance(layer, _LAYERS) and graph.is_in_channel_pruning_fn(item.dep.handler):
            total = layer.weight.shape[1] * getattr(layer, "groups", 1)
            readers.append((layer, min(1.0, len(item.idxs) / total)))
    return readers
