"""Shipping a compacted network: one safetensors file, rebuilt without unpickling code,
and export to ONNX (docs/compact.md).

The file holds the weights and, in its header's metadata, a JSON description of
the architecture: the network it was made from (a bbdrop model name and its class
count, or none for a user's own network) and the shape of every layer that
:func:`bbdrop.compact` changed. :func:`load_compact` builds that network afresh,
resizes those layers and loads the weights; no Python object is unpickled, so a
file from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bbdrop.compaction import DependentMask, PrunedLayer, SelectFeatures, set_submodule
from bbdrop.files import write_atomic

__all__ = ["export_onnx", "load_compact", "save_compact"]

FORMAT = "bbdrop-compact"
VERSION = 1
_KEY = "bbdrop"  # the metadata entry of the safetensors header that holds the description


def _extra(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is missing; install bbdrop's export extra: pip install 'bbdrop[export]'"
        ) from err


def save_compact(
    model: nn.Module,
    path: str | Path,
    model_name: str | None = None,
    num_classes: int | None = None,
) -> Path:
    """Write the compacted ``model`` (:func:`bbdrop.compact`) to ``path`` (a
    ``.safetensors`` file), all or nothing. ``model_name`` and ``num_classes``: the
    bbdrop model it was made from (``bbdrop.create_model``), so that
    :func:`load_compact` needs nothing else; without them, loading needs the
    uncompacted network as a template."""
    safetensors = _extra("safetensors.torch")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a compact file ends in .safetensors, got {path.name!r}")
    description = {
        "format": FORMAT,
        "version": VERSION,
        "model": None if model_name is None else {"name": model_name, "num_classes": num_classes},
        "layers": {name: _spec(m) for name, m in _changed(model)},
        "dtype": str(next(model.parameters(), torch.empty(0)).dtype).removeprefix("torch."),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = safetensors.save(tensors, metadata={_KEY: json.dumps(description)})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path


def load_compact(path: str | Path, template: nn.Module | None = None) -> nn.Module:
    """The network :func:`save_compact` wrote to ``path``, in eval mode. ``template``:
    the uncompacted network (any weights), needed when the file was saved without a
    bbdrop model name; its layers are replaced, so pass one you do not need."""
    safetensors = _extra("safetensors.torch")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no compact file {str(path)!r}; write one with bbdrop compact")
    data = path.read_bytes()
    try:
        tensors = safetensors.load(data)
        description = json.loads(_metadata(data)[_KEY])
    except Exception as err:  # a truncated or foreign file: its cause, in one line
        raise ValueError(
            f"{path} is not a readable bbdrop compact file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); write it again with "
            "bbdrop compact"
        ) from err
    if description.get("format") != FORMAT or description.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a bbdrop compact file of version {VERSION} (format "
            f"{description.get('format')!r}, version {description.get('version')!r})"
        )
    if template is None:
        if description["model"] is None:
            raise ValueError(
                f"{path} was saved without a bbdrop model name: pass the uncompacted network "
                "as load_compact(path, template=MyNet())"
            )
        from bbdrop.models import create_model

        template = create_model(description["model"]["name"],
                                num_classes=description["model"]["num_classes"])  # fmt: skip
    try:
        for name, spec in description["layers"].items():
            template.get_submodule(name)  # AttributeError where the template has no such layer
            set_submodule(template, name, _build(spec))
        dtype = getattr(torch, description.get("dtype", "float32"), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {description.get('dtype')!r}")
        template.to(dtype)  # built in float32: load_state_dict would cast into that
        template.load_state_dict(tensors, strict=True)
    except (AttributeError, RuntimeError, KeyError, ValueError) as err:
        raise ValueError(
            f"{path} does not fit the network it is loaded into: {str(err).splitlines()[0]}"
        ) from err
    return template.eval()


def export_onnx(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Write ``model`` as ONNX to ``path`` (the batch size left free), all or nothing,
    with PyTorch's torch.export-based exporter."""
    _extra("onnx")
    _extra("onnxscript")
    path = Path(path)
    batch = torch.export.Dim("batch", min=1)
    logger = logging.getLogger("torch.onnx")  # notes on torchvision ops it skips
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # deprecations inside torch's own exporter
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model.eval(), (example,), dynamic_shapes=({0: batch},),
                                        dynamo=True, verbose=False)  # fmt: skip
    finally:
        logger.setLevel(level)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, program.model_proto.SerializeToString())
    return path


# -- the description ------------------------------------------------------------------
def _changed(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules compact() may have changed, outermost first: layers with a gather or
    mask (PrunedLayer) and resizable layers outside them."""
    out, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, PrunedLayer) or type(m) in _BUILDERS:
            out.append((name, m))
            if isinstance(m, PrunedLayer):
                inside.add(name)
    return out


def _spec(m: nn.Module) -> dict[str, Any]:
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
    raise TypeError(f"no description for {type(m).__name__}")  # pragma: no cover


_BUILDERS = {
    nn.Linear: lambda s: nn.Linear(s["in"], s["out"], bias=s["bias"]),
    nn.Conv2d: lambda s: nn.Conv2d(
        s["in"], s["out"], tuple(s["kernel_size"]), tuple(s["stride"]),
        s["padding"] if isinstance(s["padding"], str) else tuple(s["padding"]),
        tuple(s["dilation"]), s["groups"], s["bias"], s["padding_mode"]),
    nn.BatchNorm1d: lambda s: nn.BatchNorm1d(s["num_features"], s["eps"], s["momentum"],
                                             s["affine"], s["track_running_stats"]),
    nn.BatchNorm2d: lambda s: nn.BatchNorm2d(s["num_features"], s["eps"], s["momentum"],
                                             s["affine"], s["track_running_stats"]),
}  # fmt: skip


def _build(spec: dict[str, Any]) -> nn.Module:
    kind = spec["type"]
    if kind == "PrunedLayer":
        return PrunedLayer(*[_build(c) for c in spec["children"]])
    if kind == "SelectFeatures":
        return SelectFeatures(torch.zeros(spec["size"], dtype=torch.long), spec["num_features"])
    if kind == "DependentMask":
        z = torch.zeros(spec["units"])
        return DependentMask(z, z, z, z, spec["eps"], spec["threshold"])
    builders = {cls.__name__: build for cls, build in _BUILDERS.items()}
    if kind not in builders:
        raise ValueError(f"unknown layer type {kind!r} in the description")
    return builders[kind](spec)


def _metadata(data: bytes) -> dict[str, str]:
    """The metadata of a safetensors file's header (8-byte little-endian length, then
    JSON)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]
