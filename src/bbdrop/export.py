"""Shipping a compacted network: one safetensors file, rebuilt without unpickling code,
and export to ONNX (docs/compact.md).

The file holds the weights and, in its header's metadata, a JSON description of
the architecture: the network it was made from (a bbdrop model name and its class
count, or none for a user's own network) and the shape of every layer that
:func:`bbdrop.compact` changed. :func:`load_compact` builds that network afresh,
resizes those layers and loads the weights; no Python object is unpickled, so a
file from elsewhere cannot run code.

Nor can such a file make :func:`load_compact` allocate more than about its own
size. The header is read first (its length checked against the file's) and every
field of it is checked: each tensor's dtype, shape and byte range, each field of
the description against its accepted range. The network and the described layers
are built on the meta device (shapes without memory) and every parameter and
buffer is compared with the stored tensor; only then are the weights read. Each
problem is one ``ValueError`` naming the file and the field.

Writing is checked the same way, before anything is written: :func:`compact_bytes`
refuses a network that still has gates or skips units at run time, and loads the
bytes it made back from memory; :func:`onnx_bytes` refuses them before torch's
exporter runs, and turns the exporter's failure into one line. :func:`save_compact`
and :func:`export_onnx` check the path, then write all or nothing
(:func:`bbdrop.files.write_atomic`). :func:`check_export_extras` finds a missing
optional package before any work is done.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import re
import reprlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bbdrop.attach import GatedLayer
from bbdrop.compaction import DependentMask, PrunedLayer, SelectFeatures, set_submodule
from bbdrop.files import check_writable, write_together
from bbdrop.gates.base import Gate
from bbdrop.runtime import SkipZeroInputs

__all__ = [
    "check_compact_path",
    "check_export_extras",
    "check_onnx_path",
    "compact_bytes",
    "export_onnx",
    "load_compact",
    "onnx_bytes",
    "save_compact",
]

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


def check_export_extras(onnx: bool = False) -> None:
    """Raise the ImportError (with ``pip install 'bbdrop[export]'``) unless the optional
    packages are installed: safetensors for a compact file, and with ``onnx`` onnx
    and onnxscript too. Call it before the work whose result goes to these files, so
    that a missing package is found before anything is done or written."""
    for module in ("safetensors.torch", *(("onnx", "onnxscript") if onnx else ())):
        _extra(module)


# -- writing --------------------------------------------------------------------------
def compact_bytes(
    model: nn.Module,
    model_name: str | None = None,
    num_classes: int | None = None,
    *,
    template: nn.Module | None = None,
) -> bytes:
    """The compact file of ``model`` (the result of :func:`bbdrop.compact`), checked.

    ``model_name`` and ``num_classes``: the bbdrop model it was made from
    (``bbdrop.create_model``), so that :func:`load_compact` needs nothing else.
    Without them, loading needs the uncompacted network as a template; pass it here
    as ``template`` (it is not changed) to check that the file loads into it.

    The bytes are loaded back from memory, as :func:`load_compact` would load them
    (into the named model, or ``template``); without either, the header is parsed
    back. ValueError, before anything is written: a network with gates or run-time
    skipping, an unknown model name, a name without its class count, a network that
    does not fit the named model or the template."""
    safetensors = _extra("safetensors.torch")
    _refuse_unfinished(model, "save")
    _check_model_name(model_name, num_classes)
    if template is not None and not isinstance(template, nn.Module):
        raise ValueError(f"template must be the uncompacted nn.Module, got {_show(template)}")
    changed = _changed(model)
    if any(name == "" for name, _ in changed):
        raise ValueError(
            f"the network is itself one layer ({type(model).__name__}); a compact file "
            "describes the layers of a network: wrap it, e.g. nn.Sequential(layer)"
        )
    description = {
        "format": FORMAT,
        "version": VERSION,
        "model": None if model_name is None else {"name": model_name, "num_classes": num_classes},
        "layers": {name: _spec(m) for name, m in changed},
        "dtype": str(next(model.parameters(), torch.empty(0)).dtype).removeprefix("torch."),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = safetensors.save(tensors, metadata={_KEY: json.dumps(description)})
    _check_loads_back(data, model_name, num_classes, template, safetensors)
    return data


def save_compact(
    model: nn.Module,
    path: str | Path,
    model_name: str | None = None,
    num_classes: int | None = None,
    *,
    template: nn.Module | None = None,
) -> Path:
    """Write the compacted ``model`` (:func:`bbdrop.compact`) to ``path`` (a
    ``.safetensors`` file), all or nothing; :func:`compact_bytes` says what is
    checked. ``path`` must not be a folder, and a file already there must be a
    bbdrop compact file (it is replaced); its parent folders are made."""
    path = check_compact_path(path)
    _write(path, compact_bytes(model, model_name, num_classes, template=template))
    return path


def onnx_bytes(model: nn.Module, example: Tensor) -> bytes:
    """``model`` as an ONNX model (the batch size of ``example`` left free), made by
    PyTorch's torch.export-based exporter with its logging, prints and warnings
    held back. ``model`` is put in eval mode.

    ValueError: a network with gates or run-time skipping (before the exporter
    runs), or the exporter's failure, in one line with its cause."""
    _extra("onnx")
    _extra("onnxscript")
    _refuse_unfinished(model, "export")
    if not isinstance(example, Tensor) or example.dim() < 1:
        raise ValueError(f"example must be an input batch (a Tensor), got {_show(example)}")
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(model.eval(), (example,), dynamic_shapes=({0: batch},),
                                        dynamo=True, verbose=False)  # fmt: skip
        except Exception as err:  # the cause, in one line (the exporter's own is a page)
            raise ValueError(_exporter_failure(err)) from None
    return program.model_proto.SerializeToString()


def export_onnx(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Write ``model`` as ONNX to ``path`` (an ``.onnx`` file; :func:`onnx_bytes`), all
    or nothing. ``path`` must not be a folder, and a file already there must be an
    ONNX model (it is replaced); its parent folders are made."""
    check_export_extras(onnx=True)  # before the path check, which parses with onnx
    path = check_onnx_path(path)
    _write(path, onnx_bytes(model, example))
    return path


def _refuse_unfinished(model: nn.Module, verb: str) -> None:
    """ValueError for what is not a finished network: ``model`` not a module, gates
    still attached (compact it first), or run-time skipping (runtime_pruned's copy,
    whose data-dependent control flow neither the file nor ONNX holds)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {_show(model)}")
    gated = [n for n, m in model.named_modules() if isinstance(m, GatedLayer)]
    gated = gated or [n for n, m in model.named_modules() if isinstance(m, Gate)]
    if gated:
        raise ValueError(
            f"the network still has bbdrop gates (at {_names(gated)}); {verb} the compacted "
            f"network instead: small = bbdrop.compact(net, example), then {verb} small"
        )
    skipping = [n for n, m in model.named_modules() if isinstance(m, SkipZeroInputs)]
    if skipping:
        raise ValueError(
            f"the network skips switched-off units at run time (bbdrop.runtime_pruned: "
            f"SkipZeroInputs at {_names(skipping)}), data-dependent control flow that "
            f"{'ONNX' if verb == 'export' else 'a compact file'} cannot hold; {verb} the "
            "compacted network from bbdrop.compact(net, example), whose DBB masks are kept"
            + ("" if verb == "export" else ", and apply bbdrop.runtime_pruned after loading")
        )


def _check_model_name(model_name: object, num_classes: object) -> None:
    """ValueError unless ``model_name`` is None or a registered model, given with its
    class count (and no class count without a name)."""
    from bbdrop.models import list_models

    if model_name is None:
        if num_classes is not None:
            raise ValueError(
                f"num_classes={num_classes!r} without a model_name: give the bbdrop model "
                "name too, or neither for a network of your own"
            )
        return
    if not isinstance(model_name, str) or model_name not in list_models():
        raise ValueError(
            f"unknown model {_show(model_name)}; bbdrop's models are {list_models()}: pass "
            "the one the network was made from, or none for a network of your own "
            "(then load the file with template=)"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ValueError(
            f"model_name {model_name!r} needs num_classes, the class count it was built "
            f"with (an integer in [2, {_bound(MAX_WIDTH)}]), got {_show(num_classes)}"
        )
    if not 2 <= num_classes <= MAX_WIDTH:
        raise ValueError(f"num_classes must be in [2, {_bound(MAX_WIDTH)}], got {num_classes!r}")


def _check_loads_back(
    data: bytes,
    model_name: str | None,
    num_classes: int | None,
    template: nn.Module | None,
    safetensors: Any,
) -> None:
    """ValueError unless ``data`` loads as :func:`load_compact` would load it: into
    the named model, else into a meta copy of ``template``; with neither, unless
    its header parses back."""
    try:
        head = data[: 8 + _header_length(data[:8], len(data))]
        entries, description = _parse(head, len(data))
        if model_name is None and template is None:
            return
        net = _network(description, None if model_name is not None else _meta_copy(template))
        _check_fit(net, entries)
        _materialise(net, data, safetensors)
    except _FileError as err:
        if err.kind != "fit":  # a layer of the network outside what a description holds
            raise ValueError(
                f"the compact file of this network would not load back ({err.what()}): a "
                "compact file cannot hold the network as it is; save the network "
                "bbdrop.compact returned (if that is this one, please report it to bbdrop)"
            ) from None
        if model_name is not None:
            raise ValueError(
                f"the network is not a compacted bbdrop {model_name!r} with {num_classes} "
                f"classes: {err.what()}; pass the model name and class count it was made "
                "from, or neither (then load the file with template=<the uncompacted network>)"
            ) from None
        raise ValueError(
            f"the network does not fit the template: {err.what()}; pass the uncompacted "
            "network it was made from as template="
        ) from None


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the meta device: its
    structure, without copying (or allocating) its weights."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's exporter without its noise: its loggers (torch.*, onnx*) raised above
    CRITICAL, its prints to stdout and stderr and its warnings held back (a failure
    prints some 70 lines). Process-wide while it runs; restored after."""
    roots = ("torch", "onnx", "onnxscript", "onnx_ir")
    names = [n for n, lg in list(logging.Logger.manager.loggerDict.items())
             if isinstance(lg, logging.Logger) and n.split(".")[0] in roots]  # fmt: skip
    loggers = [logging.getLogger(n) for n in {*roots, *names}]
    levels = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    sink = io.StringIO()
    try:
        with (warnings.catch_warnings(), contextlib.redirect_stdout(sink),
              contextlib.redirect_stderr(sink)):  # fmt: skip
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in levels:
            lg.setLevel(level)


def _exporter_failure(err: BaseException) -> str:
    """One line for a failure of torch's exporter: its innermost cause, first line."""
    root, seen = err, 0
    while root.__cause__ is not None and seen < 20:
        root, seen = root.__cause__, seen + 1
    return (
        f"torch's ONNX exporter cannot export this network ({type(root).__name__}: "
        f"{_first_line(root)}); export the compacted network (bbdrop.compact) with an "
        "example batch it runs on, or change the operation the cause names"
    )


# -- paths ----------------------------------------------------------------------------
def check_compact_path(path: str | Path) -> Path:
    """``path`` as a place :func:`save_compact` may write to, checked without writing:
    it ends in ``.safetensors``, is not a folder, lies under folders (not files), and
    a file already there is a bbdrop compact file (which may be replaced).
    ValueError otherwise, naming the path and what to do."""
    return _target(path, ".safetensors", "a compact file", "a bbdrop compact file",
                   _is_compact_file)  # fmt: skip


def check_onnx_path(path: str | Path) -> Path:
    """``path`` as a place :func:`export_onnx` may write to, checked without writing:
    it ends in ``.onnx``, is not a folder, lies under folders (not files), and a file
    already there is an ONNX model (which may be replaced). ValueError otherwise."""
    return _target(path, ".onnx", "an ONNX file", "an ONNX model", _is_onnx_file)


def _target(
    path: str | Path, suffix: str, noun: str, kind: str, recognise: Callable[[Path], bool]
) -> Path:
    """``path`` as a place to write ``noun`` to (see :func:`check_compact_path`); a file
    already there only if ``recognise`` says it is ``kind``."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{path}: {noun} ends in {suffix}, got {path.name!r}; give a path "
                         f"ending in {suffix}")  # fmt: skip
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; give the path of a file in it, e.g. {path / ('net' + suffix)}"
        )
    if (path.exists() or path.is_symlink()) and not (path.is_file() and recognise(path)):
        raise ValueError(f"{path} exists and is not {kind}; choose another path or delete it")
    check_writable(path)  # and no file where a folder above it should be
    return path


def _write(path: Path, data: bytes) -> None:
    """``data`` to ``path``, all or nothing, its parent folders made; a failure is one
    ValueError that names ``path`` (not the temporary file's name)."""
    write_together({path: data})


def _is_compact_file(path: Path) -> bool:
    """Whether ``path`` holds a bbdrop compact file (its header says so)."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            header = json.loads(f.read(_header_length(first, size)))
        return json.loads(header["__metadata__"][_KEY])["format"] == FORMAT
    except Exception:  # anything unreadable is not one of ours
        return False


def _is_onnx_file(path: Path) -> bool:
    """Whether ``path`` holds an ONNX model (a ModelProto with a graph); its external
    data, if any, is not read."""
    onnx = _extra("onnx")
    if path.stat().st_size >= 2**31:  # protobuf's limit: no ONNX model is this large
        return False
    try:
        proto = onnx.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except Exception:  # anything unparsable is not an ONNX model
        return False
    return proto.ir_version > 0 and proto.HasField("graph")


# -- loading --------------------------------------------------------------------------
def load_compact(path: str | Path, template: nn.Module | None = None) -> nn.Module:
    """The network :func:`save_compact` wrote to ``path``, in eval mode, on the CPU.
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
    :func:`load_compact` and :func:`compact_bytes` put it in their own sentences.

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
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad(f"{field}.shape", "a list of integers >= 0", shape)
    offsets = _field(entry, "data_offsets", field)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
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
    """One layer's spec, checked against :data:`_SCHEMAS`: its values, cleaned (pairs
    as tuples). A PrunedLayer holds 1 to 4 layers that are not PrunedLayers."""
    spec = _object(spec, field)
    kind = _one_of(*_SCHEMAS, *([] if inner else ["PrunedLayer"]))(
        _field(spec, "type", field), f"{field}.type"
    )
    if kind == "PrunedLayer":
        children = _field(spec, "children", field)
        if not isinstance(children, list) or not 1 <= len(children) <= 4:
            raise _bad(f"{field}.children", "a list of 1 to 4 layers", children)
        return {"type": kind, "children": [_layer(c, f"{field}.children.{i}", inner=True)
                                           for i, c in enumerate(children)]}  # fmt: skip
    return {"type": kind, **{key: check(_field(spec, key, field), f"{field}.{key}")
                             for key, check in _SCHEMAS[kind].items()}}  # fmt: skip


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
    if isinstance(m, DependentMask):
        return {"type": "DependentMask", "units": m.pi.numel(), "eps": m.eps,
                "threshold": m.threshold}  # fmt: skip
    raise ValueError(
        f"a compacted layer holds a {type(m).__name__}, which a compact file cannot "
        "describe; save the network bbdrop.compact returned, unchanged"
    )


def _build(spec: dict[str, Any], field: str) -> nn.Module:
    """The layer a checked ``spec`` describes (on the current default device); a field
    error where torch refuses the combination (groups that do not divide the
    channels, padding 'same' with a stride)."""
    kind = spec["type"]
    try:
        if kind == "PrunedLayer":
            return PrunedLayer(*[_build(c, f"{field}.children.{i}")
                                 for i, c in enumerate(spec["children"])])  # fmt: skip
        return _BUILDERS[kind](spec)
    except _FileError:
        raise
    except (ValueError, RuntimeError, TypeError) as err:
        raise _FileError(f"describes a {kind} that torch refuses ({_first_line(err)})",
                         field) from None  # fmt: skip


def _dependent_mask(s: dict[str, Any]) -> DependentMask:
    z = torch.zeros(s["units"])
    return DependentMask(z, z, z, z, s["eps"], s["threshold"])


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
    "DependentMask": _dependent_mask,
}  # fmt: skip


# -- checking the fields of a description ---------------------------------------------
# A check takes a value and its field (dotted) and returns the value, cleaned, or raises
# a field error that shows the value and what is accepted.
Check = Callable[[Any, str], Any]


def _bad(field: str, want: str, got: object) -> _FileError:
    return _FileError(f"must be {want}, got {_show(got)}", field)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        if not _is_int(value) or not lo <= value <= hi:
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
        number = math.nan
        if isinstance(value, float) or _is_int(value):
            with contextlib.suppress(OverflowError):  # an int beyond float's range
                number = float(value)
        inside = lo <= number <= hi if closed else lo < number < hi
        if not (math.isfinite(number) and inside):
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
                and all(_is_int(v) and lo <= v <= hi for v in value)):  # fmt: skip
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
    "DependentMask": {"units": _WIDTH, "eps": _number(0, 1, closed=False),
                      "threshold": _number(0, 1, closed=True)},
}  # fmt: skip


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
