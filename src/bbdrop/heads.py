"""Gates on the heads of an attention written by hand: one unit per head, the head's
query, key, value and output weights coupled, removed whole by :func:`bbdrop.compact`.

An attention with H heads computes, for head h, ``softmax(q_h k_h^T / sqrt(dk)) v_h``
from the slices ``[h*dk, (h+1)*dk)`` of its query and key projections' outputs and
``[h*dv, (h+1)*dv)`` of its value projection's, and writes the concatenated heads
through the output projection ``o``, whose input features ``[h*dv, (h+1)*dv)`` are
head h's. The gate multiplies those features by the head's value (the head's output,
per example: a unit of :attr:`bbdrop.Gate.unit_size` = dv features, on ``o``'s
input). A head the gate switches off gives ``o`` zeros for every example, so removing
its rows of q, k and v, its columns of o, and one from the head count is exact: the
other heads never see it (softmax runs within a head).

Which layers are a head's, and where the code keeps its head count, cannot be read
off the traced graph (the count is a Python int the forward pass reshapes with), so
the user names them: :class:`AttentionHeads`. PyTorch's ``nn.MultiheadAttention``
computes its heads in one fused call that no hook reaches, and its fused kernels need
every head, so its heads take no gate (:func:`bbdrop.placement.coupled_groups` says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["AttentionHeads", "ResolvedHeads", "remove_heads_", "resolve_heads"]


@dataclass(frozen=True)
class AttentionHeads:
    """The heads of one hand-written attention, by qualified module names (as
    ``model.named_modules()`` gives them): the ``nn.Linear`` projections ``q``, ``k``,
    ``v`` and ``o`` (``o`` reads the heads concatenated, head after head), and
    ``count``, the qualified name of the int attribute that holds the number of heads
    and that the forward pass reshapes with (``"blocks.0.attn.heads"``). Compaction
    lowers it to the heads kept. ``batch_first``: whether ``o`` reads (N, T, H * dv)
    rather than (T, N, H * dv).

    Example::

        heads = [bbdrop.AttentionHeads(q=f"blocks.{i}.q", k=f"blocks.{i}.k",
                                       v=f"blocks.{i}.v", o=f"blocks.{i}.o",
                                       count=f"blocks.{i}.heads") for i in range(6)]
        bbdrop.attach_gates_(net, "bb", example=x[:8], heads=heads)
    """

    q: str
    k: str
    v: str
    o: str
    count: str
    batch_first: bool = True


@dataclass(frozen=True)
class ResolvedHeads:
    """An :class:`AttentionHeads` found in a model: its layers, the module that holds
    the count and the count's attribute name, the number of heads and their widths."""

    spec: AttentionHeads
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    owner: nn.Module
    attribute: str
    heads: int
    dk: int
    dv: int


def resolve_heads(model: nn.Module, spec: object) -> ResolvedHeads:
    """``spec`` found in ``model`` and checked; ValueError naming what does not fit."""
    if not isinstance(spec, AttentionHeads):
        raise TypeError(
            f"heads must be a list of bbdrop.AttentionHeads, got an item of type "
            f"{type(spec).__name__}"
        )
    modules = dict(model.named_modules())
    layers = {}
    for role in ("q", "k", "v", "o"):
        name = getattr(spec, role)
        module = modules.get(name)
        if module is None:
            raise ValueError(f"AttentionHeads.{role}={name!r} is not a module of the model")
        if type(module) is not nn.Linear:
            raise ValueError(
                f"AttentionHeads.{role}={name!r} is a {type(module).__name__}; the heads' "
                "projections must be nn.Linear layers"
            )
        layers[role] = module
    if len({id(m) for m in layers.values()}) < 4:
        raise ValueError(
            "AttentionHeads names the same layer twice; a packed q/k/v projection is not "
            "supported: give the attention separate q, k, v and o layers"
        )
    owner_name, _, attribute = spec.count.rpartition(".")
    owner = modules.get(owner_name)
    heads = getattr(owner, attribute, None) if owner is not None else None
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(
            f"AttentionHeads.count={spec.count!r} must name a positive int attribute of a "
            f"module (the head count the forward pass reshapes with), found {heads!r}"
        )
    q, k, v, o = (layers[r] for r in ("q", "k", "v", "o"))
    if q.out_features != k.out_features or q.out_features % heads or v.out_features % heads:
        raise ValueError(
            f"q, k and v of {spec.count!r} give {q.out_features}, {k.out_features} and "
            f"{v.out_features} features: q and k must give the same number, and each a "
            f"multiple of the {heads} heads"
        )
    if o.in_features != v.out_features:
        raise ValueError(
            f"o reads {o.in_features} features but v gives {v.out_features}: o must read "
            "the heads' outputs concatenated"
        )
    return ResolvedHeads(spec, q, k, v, o, owner, attribute, heads,
                         q.out_features // heads, v.out_features // heads)  # fmt: skip


@torch.no_grad()
def remove_heads_(net: nn.Module, spec: AttentionHeads, keep: Tensor) -> Tensor:
    """Remove, in place, the heads of ``spec`` in ``net`` where ``keep`` (H,) is False:
    their rows of q, k and v (weights and biases), their columns of o, and as many
    from the head count. When no head is kept, the first stays (its output is zero
    wherever the gate switched it off: torch's layers need a feature). Returns the
    heads kept (indices into the heads before)."""
    r = resolve_heads(net, spec)
    keep = keep.detach().to("cpu", torch.bool).clone()
    if keep.numel() != r.heads:
        raise ValueError(f"{spec.count!r} has {r.heads} heads, keep has {keep.numel()} values")
    if not keep.any():
        keep[0] = True
    kept = keep.nonzero().flatten()
    if len(kept) == r.heads:
        return kept
    for layer, width in ((r.q, r.dk), (r.k, r.dk), (r.v, r.dv)):
        rows = keep.repeat_interleave(width).nonzero().flatten().to(layer.weight.device)
        layer.weight = nn.Parameter(layer.weight[rows].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[rows].clone())
        layer.out_features = len(rows)
    columns = keep.repeat_interleave(r.dv).nonzero().flatten().to(r.o.weight.device)
    r.o.weight = nn.Parameter(r.o.weight[:, columns].clone())
    r.o.in_features = len(columns)
    setattr(r.owner, r.attribute, len(kept))
    return kept
