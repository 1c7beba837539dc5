"""A finished run: one stage's trained network loaded back (``load_stage``), and that
network compacted and written as a compact file and ONNX model (``compact_run``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bbdrop.config import RunConfig, load_recorded_config
from bbdrop.data import Dataset
from bbdrop.factories import build_model, is_factory
from bbdrop.files import write_together
from bbdrop.pipeline import load_data, pipeline_stages, stage_model
from bbdrop.stage_figures import compacted
from bbdrop.train.checkpoint import load_checkpoint, load_model_state


def load_stage(
    run_dir: str | Path, stage: str | None = None, data: Dataset | None = None
) -> tuple[RunConfig, str, torch.nn.Module, Dataset]:
    """The configuration, stage name, trained network (eval mode) and data of ``stage``
    of the run in ``run_dir`` (default: its last finished stage with gates)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.toml); give the folder "
                         "bbdrop run or reproduce wrote, e.g. runs/NAME/seed-1")  # fmt: skip
    cfg = load_recorded_config(run_dir / "config.toml")
    names = [s.name for s in pipeline_stages(cfg)]
    finished = [n for n in names if (run_dir / f"{n}.pt").is_file()]
    if stage is None:
        gated = [n for n in finished if n != "pretrain"]
        if not gated:
            raise ValueError(f"{run_dir} has no finished stage with gates yet (stages: "
                             f"{', '.join(names)}); train one first")  # fmt: skip
        stage = gated[-1]
    elif stage not in names:
        raise ValueError(f"unknown stage {stage!r}; stages of {cfg.name!r}: {', '.join(names)}")
    elif stage not in finished:
        raise ValueError(f"stage {stage!r} has not finished in {run_dir} (no {stage}.pt)")
    data = load_data(cfg) if data is None else data
    model = stage_model(cfg, stage, data.num_classes, data.train_x[:8])
    path = run_dir / f"{stage}.pt"
    load_model_state(model, load_checkpoint(path), path)
    return cfg, stage, model.eval(), data


def compact_run(
    run_dir: str | Path,
    stage: str | None = None,
    out: str | Path | None = None,
    onnx: str | Path | None = None,
    round_to: int = 1,
) -> dict[str, Any]:
    """Compact ``stage`` of the run in ``run_dir`` (default: its last finished stage
    with gates; widths rounded up to multiples of ``round_to``, see
    :func:`bbdrop.compact`) and write it with :func:`bbdrop.save_compact` to ``out``
    (default: ``<run_dir>/<stage>.compact.safetensors``), and as ONNX to ``onnx`` if given.

    Everything is checked and both files are made in memory before the first is
    written: the paths (suffixes, ``out`` not ``onnx``, no file replaced that is not
    a compact file or an ONNX model), the extras, the network, its export. Returns
    what was done: the stage, the files, the units per gated layer before and after,
    the parameter counts, the largest output difference to the gated network on
    the first training examples, the model's name and class count.

    A network of the user's own (``model.name = "module.path:attribute"``) is saved
    without a bbdrop model name: ``load_compact(path, template=factory(num_classes=N))``
    loads it."""
    from bbdrop import export
    from bbdrop.attach import gated_layers, units_kept
    from bbdrop.compaction import inference_parameters
    from bbdrop.metrics import count_parameters

    export.check_export_extras(onnx=onnx is not None)
    cfg, stage, model, data = load_stage(run_dir, stage)
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else run_dir / f"{stage}.compact.safetensors"
    _check_outputs(target, None if onnx is None else Path(onnx))
    if not list(gated_layers(model)):
        raise ValueError(f"stage {stage!r} has no gates: nothing to compact; pick a later stage")
    small, example, difference = compacted(model, data, round_to=round_to)
    blobs = {} if onnx is None else {Path(onnx): export.onnx_bytes(small, example[:2])}
    if is_factory(cfg.model.name):  # a network of the user's own: loaded with template=
        template = build_model(cfg.model.name, data.num_classes)
        blobs[target] = export.compact_bytes(small, template=template)
    else:
        blobs[target] = export.compact_bytes(small, cfg.model.name, data.num_classes)
    write_together(blobs)  # the ONNX first: a place that refuses it leaves no trace in the run
    return {
        "stage": stage,
        "files": list(blobs),
        "units": units_kept(model),
        "widths": _gated_widths(model, small),
        "parameters": count_parameters(model, include_gates=False),
        "parameters_compact": inference_parameters(small),
        "max_difference": difference,
        "examples": len(example),
        "model": cfg.model.name,
        "num_classes": data.num_classes,
    }


def _check_outputs(target: Path, onnx: Path | None) -> None:
    """ValueError unless the compact file and the ONNX file can be written without
    replacing anything that is not one of their kind (a checkpoint, a configuration,
    each other)."""
    from bbdrop import export

    if onnx is not None and os.path.abspath(onnx) == os.path.abspath(target):
        raise ValueError(f"--out and --onnx are the same file {str(target)!r}; give the ONNX "
                         "file its own name, e.g. net.onnx")  # fmt: skip
    export.check_compact_path(target)
    if onnx is not None:
        export.check_onnx_path(onnx)


def _gated_widths(gated: torch.nn.Module, small: torch.nn.Module) -> dict[str, int]:
    """Units left, per gated layer of ``gated``, on the gate's side in ``small``."""
    from bbdrop.attach import PLACEMENTS, gated_layers

    modules = dict(small.named_modules())  # each layer at its name, of its type
    widths = {}
    for name, g in gated_layers(gated):
        layer = modules[name]
        if type(layer) in PLACEMENTS:  # a weight layer, on the gate's side
            widths[name] = PLACEMENTS[type(layer)].width(layer, g.gate.bound_side())
        elif isinstance(layer, torch.nn.modules.batchnorm._NormBase):  # a group's norm
            widths[name] = layer.num_features
        elif isinstance(layer, torch.nn.LayerNorm):
            widths[name] = layer.normalized_shape[-1]
        elif isinstance(layer, torch.nn.GroupNorm):
            widths[name] = layer.num_channels
        else:  # a module whose width compaction does not show: the units the gate keeps
            widths[name] = int(g.gate.keep_mask().sum())
    return widths
