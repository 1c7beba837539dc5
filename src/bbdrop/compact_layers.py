"""A compact file's layer descriptions: the layers :func:`bbdrop.compact` may have
changed, each described as plain JSON data (:func:`_spec`), with what runs beside it
(its gather, its test-time mask: :mod:`bbdrop.compaction.attached`), and the layer built
afresh from a checked description (:func:`_build`). :mod:`bbdrop.export` writes
the descriptions; :mod:`bbdrop.compact_file` checks them (against
:mod:`bbdrop.compact_fields`) and builds the layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bbdrop.compact_fields import MASK_KEYS, _FileError, _first_line
from bbdrop.compaction import Beside, SelectFeatures, attach_beside_, beside
from bbdrop.compaction.attached import shared_mask
from bbdrop.gates.masks import TestTimeMask, get_mask_class

_RESIZABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


# -- the description ------------------------------------------------------------------
def _changed(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules compact() may have changed, in model order: the resizable layers and
    any layer with something beside it."""
    return [(name, m) for name, m in model.named_modules()
            if type(m) in _RESIZABLE or beside(m).children()
            or shared_mask(m) is not None]  # fmt: skip


def _mask_owners(changed: list[tuple[str, nn.Module]]) -> dict[int, str]:
    """The name of the layer each mask of ``changed`` sits beside, by the mask's id."""
    owners = {}
    for name, m in changed:
        mask = beside(m).mask
        if mask is not None:
            owners[id(mask)] = name
    return owners


def _spec(m: nn.Module, owners: dict[int, str]) -> dict[str, Any]:
    """The description of one changed layer (what :func:`_build` needs to make it), with
    what runs beside it; ``mask_of``: the layer whose mask it applies again (a further
    module of a coupled group, :func:`_mask_owners`)."""
    what = beside(m)
    if type(m) not in _RESIZABLE:
        raise ValueError(
            f"a compacted layer holds a {type(m).__name__}"
            f"{' with a gather or a mask beside it' if what.children() else ''}, which a "
            "compact file cannot describe; save the network bbdrop.compact returned, "
            "unchanged, or export it to ONNX"
        )
    if what.select is not None and type(m) not in (nn.Linear, nn.Conv2d):
        raise ValueError(
            f"a {type(m).__name__} reads through a gather, which a compact file holds in "
            "front of an nn.Linear or nn.Conv2d only; export the network to ONNX instead"
        )
    spec = {**_layer_spec(m), **_beside_spec(what)}
    shared = shared_mask(m)
    if shared is not None:
        if id(shared) not in owners or what.mask is not None:
            raise ValueError(
                f"a {type(m).__name__} applies a mask that no layer of the network holds "
                "beside it; save the network bbdrop.compact returned, unchanged"
            )
        spec["mask_of"] = owners[id(shared)]
    return spec


def _layer_spec(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in": m.in_features, "out": m.out_features,
                "bias": m.bias is not None}  # fmt: skip
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels,
                "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                "dilation": m.dilation, "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}  # fmt: skip
    return {"type": type(m).__name__, "num_features": m.num_features, "eps": m.eps,
            "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}  # fmt: skip


def _beside_spec(what: Beside) -> dict[str, Any]:
    """The descriptions of a layer's gather and mask, under "select" and "mask"."""
    spec: dict[str, Any] = {}
    if what.select is not None:
        spec["select"] = {"size": what.select.index.numel(),
                          "num_features": what.select.num_features}  # fmt: skip
    if what.mask is not None:
        spec["mask"] = _mask_spec(what.mask, what.mask_side)
    return spec


def _mask_spec(m: TestTimeMask, side: str) -> dict[str, Any]:
    """A test-time mask's description: its class name (its registry name), the side of
    its layer it is on, and its settings, one per declared field."""
    settings, fields = m.settings(), type(m).fields
    if m.layout[0] != 0:
        raise ValueError(
            f"a compact file holds the test-time masks of layers that read the batch first; "
            f"this {type(m).__name__} reads it on dimension {m.layout[0]} (a transformer "
            "with batch_first=False): export the network to ONNX instead"
        )
    if m.unit_size != 1:
        raise ValueError(
            f"a compact file holds test-time masks over single features; this "
            f"{type(m).__name__} switches attention heads of {m.unit_size} features: export "
            "the network to ONNX or save it with torch.save instead"
        )
    if set(settings) != set(fields):
        raise ValueError(
            f"{type(m).__name__}.settings() gives {sorted(settings)}, its fields declare "
            f"{sorted(fields)}: a compact file could not read it back; make them agree"
        )
    taken = sorted(set(fields) & set(MASK_KEYS))
    if taken:
        raise ValueError(
            f"{type(m).__name__}.fields names {taken}, which a compact file keeps for the "
            "mask's type and side; rename the setting"
        )
    return {"type": type(m).__name__, "side": side, **{key: settings[key] for key in fields}}


# -- building -------------------------------------------------------------------------
def _build(spec: dict[str, Any], field: str) -> nn.Module:
    """The layer a checked ``spec`` describes (on the current default device), with its
    gather and mask beside it; a field error where torch refuses the combination
    (groups that do not divide the channels, padding 'same' with a stride)."""
    kind = spec["type"]
    try:
        layer = _BUILDERS[kind](spec)
    except (ValueError, RuntimeError, TypeError) as err:
        raise _refused(kind, field, err) from None
    if "select" in spec or "mask" in spec:
        try:
            what = _beside(spec, isinstance(layer, nn.Linear))
        except (ValueError, RuntimeError, TypeError) as err:
            raise _refused(spec["mask"]["type"], f"{field}.mask", err) from None
        attach_beside_(layer, what)
    return layer


def _refused(kind: str, field: str, err: BaseException) -> _FileError:
    return _FileError(f"describes a {kind} that torch refuses ({_first_line(err)})", field)


def _beside(spec: dict[str, Any], linear: bool) -> Beside:
    """The gather and the mask a checked layer ``spec`` describes, on the dimension of
    its layer's units: the last for a ``Linear``, which reads (N, ..., K), else 1."""
    select = mask = None
    if "select" in spec:
        s = spec["select"]
        select = SelectFeatures(torch.zeros(s["size"], dtype=torch.long), s["num_features"],
                                -1 if linear else 1)  # fmt: skip
    if "mask" in spec:
        cls = get_mask_class(spec["mask"]["type"])
        mask = cls.empty({key: spec["mask"][key] for key in cls.fields})
        mask.layout = (0, -1) if linear else (0, 1)
    return Beside(select, mask, spec["mask"]["side"] if "mask" in spec else "input")


_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "Linear": lambda s: nn.Linear(s["in"], s["out"], bias=s["bias"]),
    "Conv2d": lambda s: nn.Conv2d(s["in"], s["out"], s["kernel_size"], s["stride"],
                                  s["padding"], s["dilation"], s["groups"], s["bias"],
                                  s["padding_mode"]),
    "BatchNorm1d": lambda s: nn.BatchNorm1d(s["num_features"], s["eps"], s["momentum"],
                                            s["affine"], s["track_running_stats"]),
    "BatchNorm2d": lambda s: nn.BatchNorm2d(s["num_features"], s["eps"], s["momentum"],
                                            s["affine"], s["track_running_stats"]),
}  # fmt: skip
