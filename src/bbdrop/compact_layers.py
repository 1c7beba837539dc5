"""A compact file's layer descriptions: the layers :func:`bbdrop.compact` may have
changed, each described as plain JSON data (:func:`_spec`), and the layer built
afresh from a checked description (:func:`_build`). :mod:`bbdrop.export` writes
the descriptions; :mod:`bbdrop.compact_file` checks them (against
:mod:`bbdrop.compact_fields`) and builds the layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bbdrop.compact_fields import _SCHEMAS, _FileError, _first_line
from bbdrop.compaction import PrunedLayer, SelectFeatures
from bbdrop.gates.masks import TestTimeMask, get_mask_class

_RESIZABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


# -- the description ------------------------------------------------------------------
def _changed(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules compact() may have changed, outermost first: layers with a gather or
    mask (PrunedLayer) and resizable layers outside them."""
    out, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, PrunedLayer) or type(m) in _RESIZABLE:
            out.append((name, m))
            if isinstance(m, PrunedLayer):
                inside.add(name)
    return out


def _spec(m: nn.Module) -> dict[str, Any]:
    """The description of one changed layer: what :func:`_build` needs to make it."""
    if isinstance(m, PrunedLayer):
        return {"type": "PrunedLayer", "children": [_spec(c) for c in m]}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in": m.in_features, "out": m.out_features,
                "bias": m.bias is not None}  # fmt: skip
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels,
                "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                "dilation": m.dilation, "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}  # fmt: skip
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        return {"type": type(m).__name__, "num_features": m.num_features, "eps": m.eps,
                "momentum": m.momentum, "affine": m.affine,
                "track_running_stats": m.track_running_stats}  # fmt: skip
    if isinstance(m, SelectFeatures):
        return {"type": "SelectFeatures", "size": m.index.numel(), "num_features": m.num_features}
    if isinstance(m, TestTimeMask) and type(m).__name__ not in _SCHEMAS:
        return _mask_spec(m)
    raise ValueError(
        f"a compacted layer holds a {type(m).__name__}, which a compact file cannot "
        "describe; save the network bbdrop.compact returned, unchanged"
    )


def _mask_spec(m: TestTimeMask) -> dict[str, Any]:
    """A test-time mask's description: its class name (its registry name) and its
    settings, one per declared field."""
    settings, fields = m.settings(), type(m).fields
    if m.layout[0] != 0:
        raise ValueError(
            f"a compact file holds the test-time masks of layers that read the batch first; "
            f"this {type(m).__name__} reads it on dimension {m.layout[0]} (a transformer "
            "with batch_first=False): export the network to ONNX instead"
        )
    if set(settings) != set(fields):
        raise ValueError(
            f"{type(m).__name__}.settings() gives {sorted(settings)}, its fields declare "
            f"{sorted(fields)}: a compact file could not read it back; make them agree"
        )
    return {"type": type(m).__name__, **{key: settings[key] for key in fields}}


def _on_features(pruned: PrunedLayer) -> PrunedLayer:
    """``pruned`` with its gather and mask on the last dimension when its layer is a
    ``Linear`` (which reads (N, ..., K)), as compact() made them."""
    if isinstance(pruned[-1], nn.Linear):
        for m in pruned:
            if isinstance(m, SelectFeatures):
                m.dim = -1
            elif isinstance(m, TestTimeMask):
                m.layout = (0, -1)
    return pruned


def _build(spec: dict[str, Any], field: str) -> nn.Module:
    """The layer a checked ``spec`` describes (on the current default device); a field
    error where torch refuses the combination (groups that do not divide the
    channels, padding 'same' with a stride)."""
    kind = spec["type"]
    try:
        if kind == "PrunedLayer":
            children = [_build(c, f"{field}.children.{i}") for i, c in enumerate(spec["children"])]
            return _on_features(PrunedLayer(*children))
        if kind not in _BUILDERS:  # a test-time mask (:func:`_schemas`)
            mask = get_mask_class(kind)
            return mask.empty({key: spec[key] for key in mask.fields})
        return _BUILDERS[kind](spec)
    except _FileError:
        raise
    except (ValueError, RuntimeError, TypeError) as err:
        raise _FileError(f"describes a {kind} that torch refuses ({_first_line(err)})",
                         field) from None  # fmt: skip


_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "Linear": lambda s: nn.Linear(s["in"], s["out"], bias=s["bias"]),
    "Conv2d": lambda s: nn.Conv2d(s["in"], s["out"], s["kernel_size"], s["stride"],
                                  s["padding"], s["dilation"], s["groups"], s["bias"],
                                  s["padding_mode"]),
    "BatchNorm1d": lambda s: nn.BatchNorm1d(s["num_features"], s["eps"], s["momentum"],
                                            s["affine"], s["track_running_stats"]),
    "BatchNorm2d": lambda s: nn.BatchNorm2d(s["num_features"], s["eps"], s["momentum"],
                                            s["affine"], s["track_running_stats"]),
    "SelectFeatures": lambda s: SelectFeatures(torch.zeros(s["size"], dtype=torch.long),
                                               s["num_features"]),
}  # fmt: skip
