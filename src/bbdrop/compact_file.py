"""The compact file: a compacted network as one safetensors file whose header holds
a JSON description of its architecture, and its reading (docs/compact.md, section 3).

The file holds the weights and, in its header's metadata, a description: the
network it was made from (a bbdrop model name and its class count, or none for a
user's own network) and the shape of every layer that :func:`bbdrop.compact`
changed, with the gather and the test-time mask beside it. :func:`load_compact`
builds that network afresh, resizes those layers, puts their gathers and masks back
and loads the weights; no Python object is unpickled, so a file from elsewhere
cannot run code. It reads the files of :data:`VERSION` and those of version 1
(:mod:`bbdrop.compact_v1`), whose layers it reads into the same network.

Nor can such a file make :func:`load_compact` allocate more than about its own
size. The header is read first (its length checked against the file's) and every
field of it is checked: each tensor's dtype, shape and byte range, each field of
the description against its accepted range. The network and the described layers
are built on the meta device (shapes without memory) and every parameter and
buffer is compared with the stored tensor; only then are the weights read. Each
problem is one ``ValueError`` naming the file and the field. The checks of the
fields and their wording are in :mod:`bbdrop.compact_fields`, the layers' descriptions
in :mod:`bbdrop.compact_layers`; writing the file, and ONNX export, in
:mod:`bbdrop.export`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bbdrop import validate
from bbdrop.compact_fields import (
    _SCHEMAS,
    _SELECT,
    _SIDE,
    GATHERED,
    MAX_WIDTH,
    Check,
    _bad,
    _check_gather,
    _field,
    _FileError,
    _first_line,
    _integer,
    _mask_schemas,
    _names,
    _object,
    _one_of,
    _shape,
    _show,
    _values,
)
from bbdrop.compact_layers import _build
from bbdrop.compact_v1 import upgrade_layer
from bbdrop.compaction import SelectFeatures, set_submodule
from bbdrop.compaction.attached import share_mask_

__all__ = ["FORMAT", "READS", "VERSION", "load_compact"]

FORMAT = "bbdrop-compact"
VERSION = 2  # what bbdrop writes: each layer at its name, its gather and mask beside it
READS = (1, 2)  # version 1: a layer with a gather or a mask was a PrunedLayer
_KEY = "bbdrop"  # the metadata entry of the safetensors header that holds the description
# The largest safetensors header read (JSON, about 100 bytes per tensor): 16 MiB.
MAX_HEADER = 2**24
# The tensor dtypes of a compact file (safetensors' names) and the network's dtypes.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
_FLOATS = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}  # fmt: skip
_REWRITE = "write it again with bbdrop compact (bbdrop.save_compact)"


def _extra(module: str) -> Any:
    """``module``, imported; ImportError with the pip hint if it is not installed."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is missing; install bbdrop's export extra: pip install 'bbdrop[export]'"
        ) from err


# -- loading --------------------------------------------------------------------------
def load_compact(path: str | Path, template: nn.Module | None = None) -> nn.Module:
    """The network :func:`bbdrop.save_compact` wrote to ``path``, in eval mode, on the CPU.
    ``template``: the uncompacted network (any weights), needed when the file was
    saved without a bbdrop model name; its layers are replaced, so pass one you do
    not need.

    Nothing the header declares is allocated before it is checked (see the module's
    docstring): a file from elsewhere costs about its size in memory. ValueError, in
    one line naming the file and the field: a file that is not safetensors, is cut
    short, has a malformed header or description, or does not fit the network."""
    safetensors = _extra("safetensors.torch")
    path = Path(path)
    if template is not None and not isinstance(template, nn.Module):
        raise ValueError(f"template must be the uncompacted nn.Module, got {_show(template)}")
    if not path.is_file():
        raise FileNotFoundError(f"no compact file {str(path)!r}; write one with bbdrop compact")
    try:
        head, size = _read_head(path)
        entries, description = _parse(head, size)
        if template is None and description.model is None:
            raise ValueError(
                f"{path} was saved without a bbdrop model name: pass the uncompacted network "
                "as load_compact(path, template=MyNet())"
            )
        net = _network(description, template)
        _check_fit(net, entries)
        _materialise(net, _read_all(path, head, size), safetensors, description.renames)
    except _FileError as err:
        fix = _REWRITE
        if err.kind == "fit" and template is not None:
            fix = "pass the uncompacted network the file was made from as template="
        raise ValueError(f"{err.sentence(str(path))}; {fix}") from None
    except OSError as err:
        raise OSError(f"cannot read {path}: {err.strerror or err}") from None
    return net.eval()


@dataclass(frozen=True)
class _Entry:
    """A tensor of the file, as its header declares it: bytes [begin, end) of the data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Description:
    """The checked description: (model name, class count) or None, the layers' specs
    by module name (as version 2 gives them), the network's dtype, and where the
    file's tensors go ({prefix in the file: prefix in the network}; version 1's)."""

    model: tuple[str, int] | None
    layers: dict[str, dict[str, Any]]
    dtype: torch.dtype
    renames: dict[str, str]


def _read_head(path: Path) -> tuple[bytes, int]:
    """The first 8 bytes and the header of the file at ``path``, and its size: the
    header's length is checked before the header is read."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        return first + f.read(_header_length(first, size)), size


def _read_all(path: Path, head: bytes, size: int) -> bytes:
    """The whole file, which must still begin with ``head`` and be ``size`` bytes."""
    data = path.read_bytes()
    if len(data) != size or not data.startswith(head):
        raise _FileError("it changed while it was read", kind="unreadable")
    return data


def _header_length(first: bytes, size: int) -> int:
    """The length of the header that the first 8 bytes (little-endian) declare, checked
    against the file's ``size`` and :data:`MAX_HEADER`."""
    if len(first) < 8:
        raise _FileError(f"it has {size} bytes, fewer than a safetensors header's 8",
                         kind="unreadable")  # fmt: skip
    n = int.from_bytes(first, "little")
    if not 2 <= n <= min(size - 8, MAX_HEADER):
        raise _FileError(
            f"its header length {n} is not in [2, {min(size - 8, MAX_HEADER)}] (the file "
            f"has {size} bytes, a header at most {MAX_HEADER})",
            kind="unreadable",
        )
    return n


def _parse(head: bytes, size: int) -> tuple[dict[str, _Entry], _Description]:
    """The tensor entries and the description in ``head`` (the first 8 bytes and the
    header of a file of ``size`` bytes), every field checked."""
    header = _json(head[8:], "its header")
    if not isinstance(header, dict):
        raise _FileError(f"its header must be a JSON object, got {_show(header)}",
                         kind="unreadable")  # fmt: skip
    metadata = header.pop("__metadata__", None)
    entries = _entries(header, size - len(head))
    if not isinstance(metadata, dict) or not isinstance(metadata.get(_KEY), str):
        raise _FileError(f"is not a bbdrop compact file: its header has no {_KEY!r} "
                         "description", kind="foreign")  # fmt: skip
    description = _description(_json(metadata[_KEY].encode(), "its description"))
    return _renamed(entries, description.renames), description


def _renamed(tensors: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """``tensors`` under the names the network gives them: each key that starts with a
    prefix of ``renames`` (version 1's ``fc1.2.``) with its new prefix (``fc1.``)."""
    if not renames:
        return tensors
    out, source = {}, {}
    for key, value in tensors.items():
        old = next((p for p in renames if key.startswith(p)), None)
        new = key if old is None else renames[old] + key[len(old) :]
        if new in out:
            raise _FileError(f"it stores two tensors for {new!r}: {source[new]!r} and {key!r}",
                             kind="unreadable")  # fmt: skip
        out[new], source[new] = value, key
    return out


def _json(raw: bytes, what: str) -> Any:
    """``raw`` parsed as JSON; a file error for text that is not JSON, or nested too
    deeply for Python's parser."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise _FileError(f"{what} is JSON nested too deeply", kind="unreadable") from None
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        raise _FileError(f"{what} is not JSON ({_first_line(err)})", kind="unreadable") from None


def _entries(header: dict[str, Any], data_size: int) -> dict[str, _Entry]:
    """The header's tensor entries, checked: a known dtype, a shape of integers >= 0, a
    byte range of the size that dtype and shape need, the ranges tiling the data."""
    entries: dict[str, _Entry] = {}
    try:
        for name, entry in header.items():
            entries[name] = _entry(entry, f"tensors.{name}", data_size)
    except _FileError as err:
        raise _FileError(err.problem, err.field, kind="unreadable") from None
    at = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != at:
            raise _FileError(f"its tensors leave a gap or overlap at byte {at} (at {name!r})",
                             kind="unreadable")  # fmt: skip
        at = e.end
    if at != data_size:
        raise _FileError(f"its tensors cover {at} of its {data_size} bytes of data",
                         kind="unreadable")  # fmt: skip
    return entries


def _entry(entry: object, field: str, data_size: int) -> _Entry:
    """One tensor entry of the header, checked (see :func:`_entries`)."""
    entry = _object(entry, field)
    dtype = _DTYPES[_one_of(*_DTYPES)(_field(entry, "dtype", field), f"{field}.dtype")]
    shape = _field(entry, "shape", field)
    if not isinstance(shape, list) or not all(validate.is_whole(d) and d >= 0 for d in shape):
        raise _bad(f"{field}.shape", "a list of integers >= 0", shape)
    offsets = _field(entry, "data_offsets", field)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(map(validate.is_whole, offsets))
            or not 0 <= offsets[0] <= offsets[1] <= data_size):  # fmt: skip
        raise _bad(f"{field}.data_offsets", f"[begin, end] within its {data_size} bytes of "
                   "data", offsets)  # fmt: skip
    need = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != need:
        raise _bad(f"{field}.data_offsets", f"{need} bytes apart ({dtype} of shape "
                   f"{tuple(shape)})", offsets)  # fmt: skip
    return _Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _description(d: object) -> _Description:
    """The description (a parsed JSON value), every field checked; version 1's layers
    read as version 2 gives them (:func:`bbdrop.compact_v1.upgrade_layer`)."""
    format_, version = (d.get("format"), d.get("version")) if isinstance(d, dict) else (d, None)
    if format_ != FORMAT or not (type(version) is int and version in READS):
        raise _FileError(
            f"is not a bbdrop compact file of version {' or '.join(map(str, READS))} (format "
            f"{_show(format_)}, version {_show(version)})",
            kind="foreign",
        )
    model = _field(d, "model", "")
    if model is not None:
        model = _object(model, "model", "an object {name, num_classes} or null")
        from bbdrop.models import list_models

        model = (_one_of(*list_models())(_field(model, "name", "model"), "model.name"),
                 _integer(2, MAX_WIDTH)(_field(model, "num_classes", "model"),
                                        "model.num_classes"))  # fmt: skip
    layers = _object(_field(d, "layers", ""), "layers")
    checked, renames, masks = {}, {}, _mask_schemas()
    for name, spec in layers.items():
        if not re.fullmatch(r"[^.]+(\.[^.]+)*", name):
            raise _bad("layers", "keyed by module names (dotted, no empty part)", name)
        if version == 1:
            checked[name], moved = upgrade_layer(spec, name, masks)
            renames.update(moved)
        else:
            checked[name] = _layer(spec, f"layers.{name}", masks)
    dtype = _one_of(*_FLOATS)(d.get("dtype", "float32"), "dtype")
    return _Description(model, checked, _FLOATS[dtype], renames)


def _layer(spec: object, field: str, masks: dict[str, dict[str, Check]]) -> dict[str, Any]:
    """One layer's spec, checked: its values, cleaned (pairs as tuples), and those of
    the gather in front of a Linear or Conv2d ("select") and of the test-time mask
    beside any layer ("mask", checked against ``masks``,
    :func:`~bbdrop.compact_fields._mask_schemas`)."""
    spec = _object(spec, field)
    kind = _one_of(*_SCHEMAS)(_field(spec, "type", field), f"{field}.type")
    checked = {"type": kind, **_values(spec, field, _SCHEMAS[kind])}
    if "select" in spec and kind not in GATHERED:
        raise _bad(f"{field}.select", f"absent: a {kind} reads through no gather", spec["select"])
    if "select" in spec:
        checked["select"] = _values(_object(spec["select"], f"{field}.select"),
                                    f"{field}.select", _SELECT)  # fmt: skip
        _check_gather(checked, checked["select"], f"{field}.select")
    if "mask" in spec:
        checked["mask"] = _mask(spec["mask"], f"{field}.mask", masks)
    if "mask_of" in spec:  # a further module of a coupled group: its first one's mask
        owner = spec["mask_of"]
        if not isinstance(owner, str) or "mask" in spec:
            raise _bad(f"{field}.mask_of", "the name of another layer, on a layer without a "
                       "mask of its own", owner)  # fmt: skip
        checked["mask_of"] = owner
    return checked


def _mask(spec: object, field: str, masks: dict[str, dict[str, Check]]) -> dict[str, Any]:
    """A layer's test-time mask, checked: its type (a registered mask), side and settings."""
    spec = _object(spec, field)
    kind = _one_of(*masks)(_field(spec, "type", field), f"{field}.type")
    side = _SIDE(_field(spec, "side", field), f"{field}.side")
    return {"type": kind, "side": side, **_values(spec, field, masks[kind])}


def _network(description: _Description, template: nn.Module | None) -> nn.Module:
    """The described network with the described layers on the meta device (all of it,
    for a bbdrop model), in the description's dtype: shapes without memory."""
    if template is None:
        from bbdrop.models import create_model

        name, num_classes = description.model
        try:
            with torch.device("meta"):
                template = create_model(name, num_classes=num_classes)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as err:
            raise _FileError(f"names a network that cannot be built on the meta device "
                             f"({_first_line(err)})", "model") from None  # fmt: skip
    known = {name for name, _ in template.named_modules() if name}
    for name in description.layers:
        if name not in known:
            raise _FileError(f"names {name!r}, which is not a layer of the network", "layers",
                             kind="fit")  # fmt: skip
        parts = name.split(".")
        outer = [".".join(parts[:i]) for i in range(1, len(parts))]
        held = next((o for o in outer if o in description.layers), None)
        if held is not None:
            raise _FileError(f"names both {held!r} and {name!r}, a layer inside it", "layers")
    for name, spec in description.layers.items():
        with torch.device("meta"):
            set_submodule(template, name, _build(spec, f"layers.{name}"))
    for name, spec in description.layers.items():
        if "mask_of" in spec:
            _share(template, name, spec["mask_of"], description.layers)
    return template.to(description.dtype)


def _share(net: nn.Module, name: str, owner: str, layers: dict[str, Any]) -> None:
    """Give layer ``name`` the output mask of layer ``owner`` (``mask_of``)."""
    spec = layers.get(owner)
    if spec is None or spec.get("mask", {}).get("side") != "output":
        raise _FileError(f"names {owner!r}, which is not a layer of the file with a mask on "
                         "its output", f"layers.{name}.mask_of")  # fmt: skip
    share_mask_(net.get_submodule(name), net.get_submodule(owner).mask)


def _check_fit(net: nn.Module, entries: dict[str, _Entry]) -> None:
    """A fit error unless the file stores each parameter and buffer of ``net`` with its
    shape and dtype, and nothing else."""
    expected = net.state_dict(keep_vars=True)
    for key, t in expected.items():
        layer, _, attr = key.rpartition(".")
        where = f"layer {layer!r}" if layer else "the network"
        stored = entries.get(key)
        if stored is None:
            raise _FileError(f"{where} expects {attr} of shape {_shape(t.shape)}, the file "
                             "stores none", kind="fit")  # fmt: skip
        if stored.shape != tuple(t.shape):
            raise _FileError(f"{where} expects {attr} of shape {_shape(t.shape)}, the file "
                             f"stores {_shape(stored.shape)}", kind="fit")  # fmt: skip
        if stored.dtype != t.dtype:
            raise _FileError(f"{where} expects {attr} of dtype {t.dtype}, the file stores "
                             f"{stored.dtype}", kind="fit")  # fmt: skip
    extra = sorted(set(entries) - set(expected))
    if extra:
        raise _FileError(f"the file stores {_names(extra)}, which the network has no place "
                         "for", kind="fit")  # fmt: skip


def _materialise(
    net: nn.Module, data: bytes, safetensors: Any, renames: dict[str, str] | None = None
) -> None:
    """Give ``net`` (checked against the header: :func:`_check_fit`) the tensors of
    ``data``, renamed by ``renames`` (:func:`_renamed`); no meta tensor may remain, and
    each gather's indices must lie in range."""
    try:
        tensors = _renamed(safetensors.load(data), renames or {})
    except _FileError:
        raise
    except Exception as err:  # safetensors' own checks, in one line
        raise _FileError(f"safetensors cannot read it ({type(err).__name__}: "
                         f"{_first_line(err)})", kind="unreadable") from None  # fmt: skip
    try:
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise _FileError(_first_line(err), kind="fit") from None
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise _FileError(f"the network's {_names(left)} get no value from the file",
                         kind="fit")  # fmt: skip
    _check_indices(net)


def _check_indices(net: nn.Module) -> None:
    """A field error unless each gather's indices increase and lie in [0, num_features):
    out of range, index_select would fail at the first input, not at loading."""
    for name, m in net.named_modules():
        if not isinstance(m, SelectFeatures) or m.index.numel() == 0:
            continue
        index = m.index
        inside = index.dim() == 1 and int(index[0]) >= 0 and int(index[-1]) < m.num_features
        if not (inside and bool((index[1:] > index[:-1]).all())):
            raise _bad(f"tensors.{name}.index", f"increasing indices in [0, {m.num_features})",
                       index.tolist())  # fmt: skip
