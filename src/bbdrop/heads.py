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
the user names them: :class:`AttentionHeads`.

PyTorch's ``nn.MultiheadAttention`` is found without help (:class:`FusedHeads`). It
computes its heads and its output projection in one fused call, so the gate cannot
sit between them by a hook on the projection alone: while the attention's output
projection carries a gate, hooks on the attention (:func:`route_heads_`) run the fused
call with an identity in place of the projection's weight, which yields the heads
concatenated, and then call the projection as a module, where its gate acts as on
any ``Linear``. The attention keeps its type and its state_dict keys; the cost is one
extra (E x E) product per token while the gate is on. An attention with heads removed
cannot stay an ``nn.MultiheadAttention`` (its head width is its model width divided by
its head count), so :func:`bbdrop.compact` puts a :class:`PrunedMultiheadAttention`
in its place: a subclass, with the same call, that computes the kept heads unfused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbdrop.hooks import remove_hooks_

__all__ = [
    "AttentionHeads", "FusedHeads", "PrunedMultiheadAttention", "ResolvedHeads",
    "fused_attentions", "hold_nested_", "release_nested_", "remove_heads_", "resolve_heads",
    "route_heads_", "unnested", "unroute_heads_",
]  # fmt: skip


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
def remove_heads_(
    net: nn.Module, spec: AttentionHeads | FusedHeads, keep: Tensor, *, keep_module: bool = True
) -> Tensor:
    """Remove, in place, the heads of ``spec`` in ``net`` where ``keep`` (H,) is False:
    their rows of q, k and v (weights and biases), their columns of o, and as many
    from the head count. When no head is kept, the first stays (its output is zero
    wherever the gate switched it off: torch's layers need a feature). Returns the
    heads kept (indices into the heads before). A :class:`FusedHeads` goes to
    :func:`remove_fused_heads_`."""
    if isinstance(spec, FusedHeads):
        return remove_fused_heads_(net, spec, keep, keep_module=keep_module)
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


# -- nn.MultiheadAttention ---------------------------------------------------------------


@dataclass(frozen=True)
class FusedHeads:
    """The heads of an ``nn.MultiheadAttention``, by its qualified name: gated by
    :func:`bbdrop.attach_gates_` with ``example`` (one gate per attention, one unit per
    head, on the input of its ``out_proj``), found by :func:`fused_attentions`."""

    attention: str

    @property
    def o(self) -> str:
        """The qualified name of the output projection, which carries the gate."""
        return f"{self.attention}.out_proj" if self.attention else "out_proj"


def fused_attentions(model: nn.Module) -> tuple[list[FusedHeads], dict[str, str]]:
    """The ``nn.MultiheadAttention`` modules of ``model`` whose heads can take a gate,
    and, by name, why the others cannot."""
    found, skipped = [], {}
    for name, module in model.named_modules():
        if type(module) is not nn.MultiheadAttention:
            continue
        if module.bias_k is not None or module.add_zero_attn:
            skipped[name] = (
                "an nn.MultiheadAttention with add_bias_kv or add_zero_attn: its extra key "
                "and value rows are not per head in a form compaction can cut; its heads "
                "take no gate"
            )
        else:
            found.append(FusedHeads(name))
    return found, skipped


def _identity_projection(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of a gated ``nn.MultiheadAttention``: its fused call then writes
    the heads concatenated (the output projection's weight and bias replaced by an
    identity and zeros, put back by :func:`_project_heads`)."""
    o = module.out_proj
    if not (o._forward_hooks or o._forward_pre_hooks):  # no gate, nothing beside it
        return
    query = args[0] if args else kwargs.get("query")
    if isinstance(query, Tensor) and query.dim() != 3:
        raise ValueError(
            f"a gated nn.MultiheadAttention reads batched input, (N, L, E) or (L, N, E), got "
            f"shape {tuple(query.shape)}: add a batch dimension"
        )
    module.__dict__["_bbdrop_projection"] = (o._parameters["weight"], o._parameters["bias"])
    w = o.weight
    o._parameters["weight"] = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    if o.bias is not None:
        o._parameters["bias"] = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)


def _project_heads(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """Forward hook (run even when the call fails) beside :func:`_identity_projection`:
    the output projection's own weight and bias back, and the projection applied, as a
    module (its gate's hooks run), to the heads the fused call wrote."""
    saved = module.__dict__.pop("_bbdrop_projection", None)
    if saved is None:  # not routed (nothing on the projection), or the pre-hook refused
        return None
    module.out_proj._parameters["weight"], module.out_proj._parameters["bias"] = saved
    if output is None:  # the call failed: the error goes on
        return None
    heads, weights = output
    return module.out_proj(heads), weights


_ROUTES = (_identity_projection, _project_heads)


def route_heads_(attention: nn.MultiheadAttention) -> None:
    """Make ``attention`` call its ``out_proj`` as a module (module docstring)."""
    unroute_heads_(attention)
    attention.register_forward_pre_hook(_identity_projection, with_kwargs=True)
    attention.register_forward_hook(_project_heads, with_kwargs=True, always_call=True)


def unroute_heads_(attention: nn.Module) -> None:
    """Take :func:`route_heads_`'s hooks off ``attention``."""
    remove_hooks_(attention, _ROUTES)


@torch.no_grad()
def remove_fused_heads_(
    net: nn.Module, spec: FusedHeads, keep: Tensor, *, keep_module: bool = True
) -> Tensor:
    """Remove, in place, the heads of the ``nn.MultiheadAttention`` ``spec`` names where
    ``keep`` is False: a :class:`PrunedMultiheadAttention` takes its place, with the
    same ``out_proj`` object, cut to the kept heads' columns. With every head kept the
    attention stays as it is, unless ``keep_module`` is False (something still runs
    beside its ``out_proj``, which the fused call would skip). Returns the heads kept."""
    modules = dict(net.named_modules())
    attention = modules.get(spec.attention)
    if not isinstance(attention, nn.MultiheadAttention) or not spec.attention:
        raise ValueError(
            f"{spec.attention!r} is not an nn.MultiheadAttention inside the model (a model "
            "that is one attention: wrap it in a module)"
        )
    unroute_heads_(attention)
    keep = keep.detach().to("cpu", torch.bool).clone()
    if keep.numel() != attention.num_heads:
        raise ValueError(
            f"{spec.attention!r} has {attention.num_heads} heads, keep has {keep.numel()} values"
        )
    if not keep.any():
        keep[0] = True
    kept = keep.nonzero().flatten()
    if len(kept) == attention.num_heads and keep_module:
        return kept
    pruned = PrunedMultiheadAttention(attention, keep)
    parent_name, _, child = spec.attention.rpartition(".")
    setattr(modules[parent_name], child, pruned)
    return kept


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask in the form PyTorch's attention takes it (True or -inf: left out; a float
    mask: added), as the float mask added to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` with some heads removed (:func:`remove_fused_heads_`):
    the kept heads' rows of the query, key and value projections as separate weights
    (``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``, as PyTorch's own attention
    keeps them when its key and value widths differ), their bias in ``in_proj_bias``,
    and ``out_proj`` cut to their columns. Same call and outputs as the attention it
    replaces (masks of shape (N * heads, L, S) are read for the kept heads; attention
    weights are averaged over the kept heads). It computes the heads unfused, so
    ``nn.TransformerEncoderLayer``'s fused fast path steps aside for it (it checks
    ``_qkv_same_embed_dim``)."""

    def __init__(self, source: nn.MultiheadAttention, keep: Tensor) -> None:
        nn.Module.__init__(self)
        d = source.head_dim
        kept = keep.nonzero().flatten()
        rows = keep.repeat_interleave(d).nonzero().flatten().to(source.out_proj.weight.device)
        e = source.embed_dim
        if source._qkv_same_embed_dim:
            wq, wk, wv = source.in_proj_weight.split(e)
        else:
            wq, wk, wv = source.q_proj_weight, source.k_proj_weight, source.v_proj_weight
        self.embed_dim, self.kdim, self.vdim = e, source.kdim, source.vdim
        self._qkv_same_embed_dim = False
        self.num_heads, self.head_dim = len(kept), d
        self.dropout, self.batch_first = source.dropout, source.batch_first
        self.source_heads, self.kept_heads = source.num_heads, kept.tolist()
        self.q_proj_weight = nn.Parameter(wq[rows].clone())
        self.k_proj_weight = nn.Parameter(wk[rows].clone())
        self.v_proj_weight = nn.Parameter(wv[rows].clone())
        self.register_parameter("in_proj_weight", None)
        if source.in_proj_bias is not None:
            bias = torch.cat([b[rows] for b in source.in_proj_bias.split(e)])
            self.in_proj_bias = nn.Parameter(bias.clone())
        else:
            self.register_parameter("in_proj_bias", None)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        o = source.out_proj
        o.weight = nn.Parameter(o.weight[:, rows].clone())
        o.in_features = len(rows)
        self.out_proj = o

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        (length, n, _), source, h, d = query.shape, key.shape[0], self.num_heads, self.head_dim
        bq, bk, bv = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q = F.linear(query, self.q_proj_weight, bq).view(length, n, h, d).permute(1, 2, 0, 3)
        k = F.linear(key, self.k_proj_weight, bk).view(source, n, h, d).permute(1, 2, 0, 3)
        v = F.linear(value, self.v_proj_weight, bv).view(source, n, h, d).permute(1, 2, 0, 3)
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # (N * heads before, L, S)
                attn_mask = attn_mask.view(n, self.source_heads, length, source)[:, self.kept_heads]
            mask = _additive(attn_mask, q.dtype)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask.view(n, 1, 1, source), q.dtype)
            mask = padding if mask is None else mask + padding
        # as PyTorch's own attention: the weights computed when asked for, else one
        # fused kernel (so that a FLOP count treats the two alike)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * d**-0.5) @ k.transpose(-2, -1)  # (N, heads, L, S)
            weights = (scores if mask is None else scores + mask).softmax(-1)
            if p > 0:
                weights = F.dropout(weights, p)
            attended = weights @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        heads = attended.permute(2, 0, 1, 3).reshape(length, n, h * d)  # (L, N, h * d)
        if self.batch_first and batched:
            heads = heads.transpose(0, 1)
        out = self.out_proj(heads)  # a module call: a mask beside it runs
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights if batched else weights.squeeze(0)


# -- nn.TransformerEncoder's nested tensors ------------------------------------------------

_NESTED = "_bbdrop_use_nested_tensor"


def hold_nested_(model: nn.Module) -> None:
    """Stop each ``nn.TransformerEncoder`` of ``model`` from packing a padded batch into
    a nested tensor in evaluation (its ``use_nested_tensor``): it checks its layers'
    weights for that, not their hooks, and a gate or a pruned attention cannot read a
    nested tensor. :func:`release_nested_` gives it back where nothing needs this."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and _NESTED not in module.__dict__:
            module.__dict__[_NESTED] = module.use_nested_tensor
            module.use_nested_tensor = False


@contextmanager
def unnested(model: nn.Module) -> Iterator[None]:
    """Within: no ``nn.TransformerEncoder`` of ``model`` packs a padded batch into a
    nested tensor; after: each packs as before."""
    saved = [(m, m.use_nested_tensor) for m in model.modules()
             if isinstance(m, nn.TransformerEncoder)]  # fmt: skip
    try:
        for m, _ in saved:
            m.use_nested_tensor = False
        yield
    finally:
        for m, value in saved:
            m.use_nested_tensor = value


def release_nested_(model: nn.Module) -> None:
    """Give each ``nn.TransformerEncoder`` held by :func:`hold_nested_` its own setting
    back where its layers have no hooks and no :class:`PrunedMultiheadAttention`."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and _NESTED in module.__dict__:
            inside = list(module.modules())
            if not any(m._forward_hooks or m._forward_pre_hooks for m in inside) and not any(
                isinstance(m, PrunedMultiheadAttention) for m in inside
            ):
                module.use_nested_tensor = module.__dict__.pop(_NESTED)
