"""Reading version 1 of the compact file, which bbdrop wrote before a compacted network
kept the module tree of the network it was made from (docs/compact.md, section 3).

Version 1 put a layer with a gather or a test-time mask in a ``PrunedLayer``, an
``nn.Sequential`` described as ``{"type": "PrunedLayer", "children": [...]}``, its
tensors stored under ``<name>.<position>.<tensor>``. compact() made four orders of
children: [gather, layer], [mask, layer], [gather, mask, layer] and [layer, mask] (a
mask on the layer's output). :func:`upgrade_layer` checks such a description, each
child at its version-1 field, and returns version 2's description of the same layer
(the gather and the mask beside it as "select" and "mask",
:mod:`bbdrop.compact_layers`) with where version 2 keeps its tensors.
"""

from __future__ import annotations

from typing import Any

from bbdrop.compact_fields import (
    _SCHEMAS,
    _SELECT,
    GATHERED,
    Check,
    _bad,
    _check_gather,
    _field,
    _object,
    _one_of,
    _values,
)

# The order of a PrunedLayer's children, by role: a gather and a mask before the layer
# (each optional), or a mask after it.
_ORDERS = (("layer",), ("select", "layer"), ("mask", "layer"), ("select", "mask", "layer"),
           ("layer", "mask"))  # fmt: skip
_WANT = (
    "[SelectFeatures, mask, layer] (the first two optional) or [layer, mask], the mask a "
    f"registered test-time mask, a SelectFeatures only before a {' or '.join(GATHERED)}"
)


def upgrade_layer(
    spec: object, name: str, masks: dict[str, dict[str, Check]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The version-1 description ``spec`` of layer ``name``, checked, as version 2
    describes it, and the renaming of its tensors ({old prefix: new prefix})."""
    field = f"layers.{name}"
    spec = _object(spec, field)
    kind = _one_of(*_SCHEMAS, "PrunedLayer")(_field(spec, "type", field), f"{field}.type")
    if kind != "PrunedLayer":
        return {"type": kind, **_values(spec, field, _SCHEMAS[kind])}, {}
    children = _field(spec, "children", field)
    if not isinstance(children, list) or not 1 <= len(children) <= 4:
        raise _bad(f"{field}.children", "a list of 1 to 4 layers", children)
    checked = [_child(c, f"{field}.children.{i}", masks) for i, c in enumerate(children)]
    roles = tuple(_role(c["type"]) for c in checked)
    if roles not in _ORDERS or not _gathered(checked, roles):
        raise _bad(f"{field}.children", _WANT, [c["type"] for c in checked])
    return _upgraded(checked, roles, field), {
        f"{name}.{i}.": f"{name}." if role == "layer" else f"{name}.{role}."
        for i, role in enumerate(roles)
    }


def _child(spec: object, field: str, masks: dict[str, dict[str, Check]]) -> dict[str, Any]:
    """One child of a PrunedLayer, checked: a layer, a SelectFeatures or a mask (the
    types a version-1 file knew, in one namespace)."""
    schemas = {**masks, **_SCHEMAS, "SelectFeatures": _SELECT}
    spec = _object(spec, field)
    kind = _one_of(*schemas)(_field(spec, "type", field), f"{field}.type")
    return {"type": kind, **_values(spec, field, schemas[kind])}


def _gathered(checked: list[dict[str, Any]], roles: tuple[str, ...]) -> bool:
    """Whether a gather, if there is one, is in front of a layer that reads through one."""
    return "select" not in roles or checked[roles.index("layer")]["type"] in GATHERED


def _role(kind: str) -> str:
    if kind == "SelectFeatures":
        return "select"
    return "layer" if kind in _SCHEMAS else "mask"


def _upgraded(checked: list[dict[str, Any]], roles: tuple[str, ...], field: str) -> dict[str, Any]:
    """Version 2's description of the layer whose children are ``checked``, in ``roles``."""
    at = {role: i for i, role in enumerate(roles)}
    layer = dict(checked[at["layer"]])
    if "select" in at:
        select = checked[at["select"]]
        _check_gather(layer, select, f"{field}.children.{at['select']}")
        layer["select"] = {key: select[key] for key in _SELECT}
    if "mask" in at:
        side = "input" if at["mask"] < at["layer"] else "output"
        layer["mask"] = {**checked[at["mask"]], "side": side}
    return layer
