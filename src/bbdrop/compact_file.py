"""The compact file: a compacted network as one safetensors file whose header holds
a JSON description of its architecture, and its reading (docs/compact.md, section 3).

The file holds the weights and, in its header's metadata, a description: the
network it was made from (a bbdrop model name and its class count, or none for a
user's own network) and the shape of every layer that :func:`bbdrop.compact`
changed. :func:`load_compact` builds that network afresh, resizes those layers and
loads the weights; no Python object is unpickled, so a file from elsewhere cannot
run code.

Nor can such a file make :func:`load_compact` allocate more than about its own
size. The header is read first (its length checked against the file's) and every
field of it is checked: each tensor's dtype, shape and byte range, each field of
the description against its accepted range. The network and the described layers
are built on the meta device (shapes without memory) and every parameter and
buffer is compared with the stored tensor; only then are the weights read. Each
problem is one ``ValueError`` naming the file and the field. Writing the file, and
ONNX export, are in :mod:`bbdrop.export`.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bbdrop import validate
from bbdrop.compaction import PrunedLayer, SelectFeatures, set_submodule
from bbdrop.gates.masks import Field, TestTimeMask, get_mask_class, list_masks

__all__ = ["FORMAT", "VERSION", "load_compact"]

FORMAT = "bbdrop-compact"
VERSION = 1
_KEY = "bbdrop"  # the metadata entry of the safetensors header that holds the description
# The largest width (units, features, channels, classes) a description may give, and the
# largest kernel size, stride, dilation or padding of a convolution.
MAX_WIDTH = 10**7
MAX_KERNEL = 1024
# The largest safetensors header read (JSON, about 100 bytes per tensor): 16 MiB.
MAX_HEADER = 2**24
# The tensor dtypes of a compact file (safetensors' names) and the network's dtypes.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
_FLOATS = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}  # fmt: skip
_REWRITE = "write it again with bbdrop compact (bbdrop.save_compact)"
_RESIZABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


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
        _materialise(net, _read_all(path, head, size), safetensors)
    except _FileError as err:
        fix = _REWRITE
        if err.kind == "fit" and template is not None:
            fix = "pass the uncompacted network the file was made from as template="
        raise ValueError(f"{err.sentence(str(path))}; {fix}") from None
    except OSError as err:
        raise OSError(f"cannot read {path}: {err.strerror or err}") from None
    return net.eval()


class _FileError(ValueError):
    """What is wrong with a compact file's bytes, worded without the file's name:
    :func:`load_compact` and :func:`bbdrop.export.compact_bytes` put it in their own sentences.

    ``kind``: "unreadable" (not safetensors, cut short), "foreign" (another format),
    "field" (a field of the description) or "fit" (the described network does not
    fit the stored tensors); ``field``: the field at fault, dotted, if one is."""

    def __init__(self, problem: str, field: str | None = None, kind: str = "field") -> None:
        super().__init__(problem)
        self.problem, self.field, self.kind = problem, field, kind

    def what(self) -> str:
        """The field and the problem."""
        return f"field {self.field!r} {self.problem}" if self.field else self.problem

    def sentence(self, where: str) -> str:
        """The problem of the file ``where``, in one line."""
        return {
            "unreadable": f"{where} is not a readable bbdrop compact file: {self.what()}",
            "foreign": f"{where} {self.what()}",
            "fit": f"{where}: {self.what()}: the file does not fit the network it is loaded into",
        }.get(self.kind, f"{where}: {self.what()}")


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
    by module name, and the network's dtype."""

    model: tuple[str, int] | None
    layers: dict[str, dict[str, Any]]
    dtype: torch.dtype


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
    return entries, _description(_json(metadata[_KEY].encode(), "its description"))


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
    """The description (a parsed JSON value), every field checked."""
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        format_, version = (d.get("format"), d.get("version")) if isinstance(d, dict) else (d, None)
        raise _FileError(
            f"is not a bbdrop compact file of version {VERSION} (format {_show(format_)}, "
            f"version {_show(version)})",
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
    checked = {}
    for name, spec in layers.items():
        if not re.fullmatch(r"[^.]+(\.[^.]+)*", name):
            raise _bad("layers", "keyed by module names (dotted, no empty part)", name)
        checked[name] = _layer(spec, f"layers.{name}")
    dtype = _one_of(*_FLOATS)(d.get("dtype", "float32"), "dtype")
    return _Description(model, checked, _FLOATS[dtype])


def _layer(spec: object, field: str, inner: bool = False) -> dict[str, Any]:
    """One layer's spec, checked against :func:`_schemas`: its values, cleaned (pairs
    as tuples). A PrunedLayer holds 1 to 4 layers that are not PrunedLayers."""
    spec = _object(spec, field)
    schemas = _schemas()
    kind = _one_of(*schemas, *([] if inner else ["PrunedLayer"]))(
        _field(spec, "type", field), f"{field}.type"
    )
    if kind == "PrunedLayer":
        children = _field(spec, "children", field)
        if not isinstance(children, list) or not 1 <= len(children) <= 4:
            raise _bad(f"{field}.children", "a list of 1 to 4 layers", children)
        return {"type": kind, "children": [_layer(c, f"{field}.children.{i}", inner=True)
                                           for i, c in enumerate(children)]}  # fmt: skip
    return {"type": kind, **{key: check(_field(spec, key, field), f"{field}.{key}")
                             for key, check in schemas[kind].items()}}  # fmt: skip


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
    return template.to(description.dtype)


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


def _materialise(net: nn.Module, data: bytes, safetensors: Any) -> None:
    """Give ``net`` (checked against the header: :func:`_check_fit`) the tensors of
    ``data``; no meta tensor may remain, and each gather's indices must lie in range."""
    try:
        tensors = safetensors.load(data)
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
    if set(settings) != set(fields):
        raise ValueError(
            f"{type(m).__name__}.settings() gives {sorted(settings)}, its fields declare "
            f"{sorted(fields)}: a compact file could not read it back; make them agree"
        )
    return {"type": type(m).__name__, **{key: settings[key] for key in fields}}


def _build(spec: dict[str, Any], field: str) -> nn.Module:
    """The layer a checked ``spec`` describes (on the current default device); a field
    error where torch refuses the combination (groups that do not divide the
    channels, padding 'same' with a stride)."""
    kind = spec["type"]
    try:
        if kind == "PrunedLayer":
            return PrunedLayer(*[_build(c, f"{field}.children.{i}")
                                 for i, c in enumerate(spec["children"])])  # fmt: skip
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


# -- checking the fields of a description ---------------------------------------------
# A check takes a value and its field (dotted) and returns the value, cleaned, or raises
# a field error that shows the value and what is accepted.
Check = Callable[[Any, str], Any]


def _bad(field: str, want: str, got: object) -> _FileError:
    return _FileError(f"must be {want}, got {_show(got)}", field)


def _object(value: object, field: str, want: str = "an object") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(field, want, value)
    return value


def _field(d: dict[str, Any], key: str, parent: str) -> Any:
    """``d[key]``; a field error naming ``parent.key`` where it is missing."""
    if key not in d:
        raise _FileError("is missing", f"{parent}.{key}" if parent else key)
    return d[key]


def _integer(lo: int, hi: int) -> Check:
    def check(value: Any, field: str) -> int:
        if not validate.is_whole(value) or not lo <= value <= hi:
            raise _bad(field, f"an integer in [{lo}, {_bound(hi)}]", value)
        return value

    return check


def _number(lo: float, hi: float = math.inf, closed: bool = False) -> Check:
    """A finite number in (lo, hi), or [lo, hi] where ``closed``."""
    if hi == math.inf:
        want = f">= {lo:g}" if closed else f"> {lo:g}"
    else:
        want = f"in [{lo:g}, {hi:g}]" if closed else f"in ({lo:g}, {hi:g})"

    def check(value: Any, field: str) -> float:
        number = float(value) if validate.is_number(value) else math.nan
        if not (lo <= number <= hi if closed else lo < number < hi):
            raise _bad(field, f"a finite number {want}", value)
        return number

    return check


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(field, "true or false", value)
    return value


def _one_of(*options: str) -> Check:
    def check(value: Any, field: str) -> str:
        if not isinstance(value, str) or value not in options:
            raise _bad(field, f"one of {sorted(options)}", value)
        return value

    return check


def _pair(lo: int, hi: int) -> Check:
    def check(value: Any, field: str) -> tuple[int, int]:
        if not (isinstance(value, list) and len(value) == 2
                and all(validate.is_whole(v) and lo <= v <= hi for v in value)):  # fmt: skip
            raise _bad(field, f"2 integers in [{lo}, {_bound(hi)}]", value)
        return tuple(value)

    return check


def _padding(value: Any, field: str) -> str | tuple[int, int]:
    if value in ("same", "valid"):
        return value
    try:
        return _pair(0, MAX_KERNEL)(value, field)
    except _FileError:
        raise _bad(field, f"'same', 'valid' or 2 integers in [0, {MAX_KERNEL}]", value) from None


def _optional(check: Check) -> Check:
    def maybe(value: Any, field: str) -> Any:
        return None if value is None else check(value, field)

    return maybe


_WIDTH = _integer(1, MAX_WIDTH)
_NORM: dict[str, Check] = {
    "num_features": _WIDTH, "eps": _number(0),
    "momentum": _optional(_number(0, 1, closed=True)), "affine": _flag,
    "track_running_stats": _flag,
}  # fmt: skip
_SCHEMAS: dict[str, dict[str, Check]] = {
    "Linear": {"in": _WIDTH, "out": _WIDTH, "bias": _flag},
    "Conv2d": {"in": _WIDTH, "out": _WIDTH, "kernel_size": _pair(1, MAX_KERNEL),
               "stride": _pair(1, MAX_KERNEL), "padding": _padding,
               "dilation": _pair(1, MAX_KERNEL), "groups": _WIDTH, "bias": _flag,
               "padding_mode": _one_of("zeros", "reflect", "replicate", "circular")},
    "BatchNorm1d": _NORM,
    "BatchNorm2d": _NORM,
    "SelectFeatures": {"size": _WIDTH, "num_features": _WIDTH},
}  # fmt: skip


def _schemas() -> dict[str, dict[str, Check]]:
    """:data:`_SCHEMAS` and, by class name, those of the registered test-time masks
    (:class:`bbdrop.gates.TestTimeMask`: DBB's ``DependentMask`` and any other), whose
    fields, plain data, become checks here (:func:`_field_check`)."""
    masks = {name: {key: _field_check(f) for key, f in get_mask_class(name).fields.items()}
             for name in list_masks() if name not in _SCHEMAS}  # fmt: skip
    return {**_SCHEMAS, **masks}


def _field_check(field: Field) -> Check:
    """The check of one field of a test-time mask (:data:`bbdrop.gates.masks.Field`)."""
    if field == "width":
        return _WIDTH
    if field == "flag":
        return _flag
    if field[0] == "integer":
        return _integer(field[1], field[2])
    return _number(field[1], field[2], closed=field[3] == "closed")


# -- wording --------------------------------------------------------------------------
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 4, 60, 60


def _show(value: object) -> str:
    """``repr(value)``, cut short (a hostile value may be long or deeply nested)."""
    return _REPR.repr(value)


def _bound(n: int) -> str:
    """``n`` as written in messages: 10**7 rather than 10000000."""
    k = round(math.log10(n)) if n > 0 else 0
    return f"10**{k}" if n >= 10**4 and n == 10**k else str(n)


def _shape(shape: tuple[int, ...] | torch.Size) -> str:
    return str(tuple(shape))


def _names(names: list[str]) -> str:
    """The first few of ``names``, quoted, and how many more."""
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, without terminal colours, cut to
    300 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    line = next((s.strip() for s in text.splitlines() if s.strip()), "no detail")
    return line if len(line) <= 300 else line[:297] + "..."
