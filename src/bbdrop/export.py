"""Shipping a compacted network: its compact file (:mod:`bbdrop.compact_file`) and its
ONNX model, each checked before anything is written (docs/compact.md, section 3).

:func:`compact_bytes` refuses a network that still has gates or skips units at
run time, and loads the bytes it made back from memory; :func:`onnx_bytes`
refuses them before torch's exporter runs, and turns the exporter's failure into
one line. :func:`save_compact` and :func:`export_onnx` check the path (its suffix;
no file of another kind replaced), then write all or nothing
(:func:`bbdrop.files.write_together`). :func:`check_export_extras` finds a missing
optional package before any work is done. :func:`load_compact` reads the file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.attach import is_gated
from bbdrop.compact_fields import MAX_WIDTH, _bound, _FileError, _first_line, _names, _show
from bbdrop.compact_file import (
    _KEY,
    FORMAT,
    VERSION,
    _check_fit,
    _extra,
    _header_length,
    _materialise,
    _network,
    _parse,
    load_compact,
)
from bbdrop.compact_layers import _changed, _mask_owners, _spec
from bbdrop.files import check_writable, write_together
from bbdrop.gates.base import Gate
from bbdrop.heads import PrunedMultiheadAttention
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
    pruned = [n for n, m in model.named_modules() if isinstance(m, PrunedMultiheadAttention)]
    if pruned:
        raise ValueError(
            f"{pruned[0]!r} is an nn.MultiheadAttention with heads removed, which a compact "
            "file (plain layers cut to their kept units) cannot describe; save the network "
            "with torch.save or export it with bbdrop.export_onnx"
        )
    _check_model_name(model_name, num_classes)
    if template is not None and not isinstance(template, nn.Module):
        raise ValueError(f"template must be the uncompacted nn.Module, got {_show(template)}")
    changed = _changed(model)
    owners = _mask_owners(changed)
    if any(name == "" for name, _ in changed):
        raise ValueError(
            f"the network is itself one layer ({type(model).__name__}); a compact file "
            "describes the layers of a network: wrap it, e.g. nn.Sequential(layer)"
        )
    description = {
        "format": FORMAT,
        "version": VERSION,
        "model": None if model_name is None else {"name": model_name, "num_classes": num_classes},
        "layers": {name: _spec(m, owners) for name, m in changed},
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
    gated = [n for n, m in model.named_modules() if is_gated(m)]
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
    if not validate.is_whole(num_classes):
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
