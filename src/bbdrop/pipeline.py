"""The paper's pipeline: pretrain -> BB -> DBB (BB frozen) -> pre-prune, with results.

Each stage starts from the previous stage's final checkpoint in the run
directory and writes its own (``<stage>.pt``); an unfinished stage keeps an
in-progress checkpoint (``<stage>.last.pt``) that a new call resumes from.
The resolved configuration is written as ``config.toml`` and the figures of
every finished stage to ``results.json``.

This module computes and writes files; progress is reported through a
callback and printing is left to :mod:`bbdrop.cli`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bbdrop import kernels
from bbdrop.attach import (
    active_units,
    attach_gates_,
    convert_gates_,
    gated_layers,
    units_ever_active,
    units_kept,
)
from bbdrop.config import RunConfig, load_config, to_dict, to_toml
from bbdrop.metrics import measure, paper_costs
from bbdrop.train.checkpoint import load_checkpoint, save_checkpoint
from bbdrop.train.loop import EpochRecord, Progress, evaluate, get_rng, set_rng, train_stage

__all__ = ["STAGES", "Data", "hold_out", "resolve_device", "run_pipeline", "stage_model"]

STAGES = ("pretrain", "bb", "dbb", "preprune")


class Data(Protocol):
    """What the pipeline needs of a data set (bbdrop.data.load_dataset returns one)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available; a clear error for cuda without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use cpu")
    return torch.device(name)


def _gate_kwargs(cfg: RunConfig) -> dict[str, Any]:
    g = cfg.gate
    kwargs: dict[str, Any] = {
        "alpha": g.alpha,
        "temperature": g.temperature,
        "threshold": g.threshold,
        "kl_scale": g.kl_scale,
        "conv_kl_scale": g.conv_kl_scale,
    }
    # only when set: the gate's own defaults are the authors' initial values
    kwargs.update({k: v for k, v in (("init_a", g.init_a), ("init_b", g.init_b)) if v is not None})
    return kwargs


def stage_model(cfg: RunConfig, stage: str, num_classes: int) -> nn.Module:
    """A freshly built network with the structure of ``stage`` (to load its checkpoint)."""
    from bbdrop.models import create_model

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    model = create_model(cfg.model.name, num_classes=num_classes)
    for s in STAGES[: STAGES.index(stage) + 1]:
        _to_stage(model, s, cfg)
    return model


def _batches(
    data: Data, batch_size: int, generator: torch.Generator,
    transform: Callable[[Tensor, torch.Generator], Tensor] | None,
) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:  # fmt: skip
    x, y = data.train_x, data.train_y
    n = x.shape[0]

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(n, generator=generator).to(x.device)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            xb = x[idx]
            if transform is not None:
                xb = transform(xb, generator)
            yield xb, y[idx]

    return batches


@dataclass
class StageResult:
    """The figures of one finished stage."""

    stage: str
    error: float
    units: dict[str, int]
    active: dict[str, float]
    epochs: int
    seconds_per_epoch: float
    speedup: float  # paper accounting, FLOPs(dense) / FLOPs(this stage)
    memory: float  # paper accounting, size(this stage) / size(dense)
    parameters: int  # measured: parameter values stored (gates included)
    executed_flops: int  # measured: matmul/conv FLOPs of one example's forward pass
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_pipeline(
    cfg: RunConfig,
    out_dir: str | Path,
    data: Data | None = None,
    *,
    stages: Sequence[str] = STAGES,
    progress: Progress | None = None,
    transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``stages`` of the pipeline in ``out_dir``; return the results.

    Args:
        data: the data set; loaded from ``cfg.data`` when None.
        stages: the stages to run; a stage that is not run must have its final
            checkpoint in ``out_dir`` already if a later one runs.
        transform: per-batch training augmentation ``transform(x, generator)``.
    """
    out = Path(out_dir)
    _check_recorded_config(cfg, out)
    device = resolve_device(cfg.device)
    if data is None:
        data, transform = _load_data(cfg)
    if cfg.data.validation:
        data = hold_out(data, cfg.data.validation)
    out.mkdir(parents=True, exist_ok=True)  # only once the run can start: no stray folders
    _write_atomically(out / "config.toml", to_toml(cfg))
    data = _to_device(data, device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(data, cfg.optim.batch_size, generator, transform)
    num_train = data.train_x.shape[0]
    test = (data.test_x, data.test_y)
    results = _read_results(out)

    from bbdrop.models import create_model

    model = create_model(cfg.model.name, num_classes=data.num_classes).to(device)
    for stage in STAGES:
        _to_stage(model, stage, cfg)
        final = out / f"{stage}.pt"
        if final.exists():
            state = load_checkpoint(final, map_location=device)
            model.load_state_dict(state["model"])
            results["stages"][stage] = state["result"]
            if "rng" in state:  # the next stage draws as if this one had just run
                set_rng(state["rng"], generator)
            continue
        if stage not in stages:
            later = [s for s in stages if STAGES.index(s) > STAGES.index(stage)]
            if later and _epochs(cfg, stage) != 0:
                raise ValueError(
                    f"stage {later[0]!r} starts from the {stage!r} checkpoint, and {out} has "
                    f"none; run that stage first (bbdrop train --stage {stage})"
                )
            if not later:
                break
            continue
        epochs = _epochs(cfg, stage)
        if epochs == 0:
            continue  # a skipped stage: the next one starts where the previous ended
        if stage == "preprune":
            t0 = time.perf_counter()
            ever = units_ever_active(model, data.train_x)
            for name, g in gated_layers(model):
                g.gate.preprune_(ever[name])
            error = evaluate(model, *test)
            history = [EpochRecord(0, 0.0, 0.0, 0.0, error, units_kept(model),
                                   active_units(model), time.perf_counter() - t0)]  # fmt: skip
        else:
            last = out / f"{stage}.last.pt"
            history = train_stage(model, stage, batches, num_train, test, cfg.optim, epochs,
                                  last, generator, progress)  # fmt: skip
        costs = paper_costs(model, data.test_x[:1], active=history[-1].active or None)
        measured = measure(model, data.test_x[:1])
        result = StageResult(
            stage,
            history[-1].error,
            units_kept(model),
            history[-1].active,
            epochs if stage != "preprune" else 0,
            statistics.median(r.seconds for r in history) if stage != "preprune" else 0.0,
            costs.speedup,
            costs.memory_fraction,
            measured.parameters,
            measured.flops,
            [r.to_dict() for r in history],
        ).to_dict()
        save_checkpoint(
            {"stage": stage, "model": model.state_dict(), "result": result,
             "rng": get_rng(generator)},
            final,
        )  # fmt: skip
        (out / f"{stage}.last.pt").unlink(missing_ok=True)
        results["stages"][stage] = result
        _write_json(out / "results.json", results)
    results["config"] = to_dict(cfg)
    results["kernels"] = kernels.resolved(device)  # which generator drew the gates' masks
    _write_json(out / "results.json", results)
    return results


def _epochs(cfg: RunConfig, stage: str) -> int:
    return 1 if stage == "preprune" else getattr(cfg.epochs, stage)


def _to_stage(model: nn.Module, stage: str, cfg: RunConfig) -> None:
    """Give ``model`` the gates of ``stage``, in place (the weights stay)."""
    if stage == "bb":
        attach_gates_(model, "bb", **_gate_kwargs(cfg))
    elif stage == "dbb":
        convert_gates_(model, "dbb", freeze_bb=True)


def _check_recorded_config(cfg: RunConfig, out: Path) -> None:
    """ValueError if ``out`` holds a run of another configuration."""
    path = out / "config.toml"
    if path.exists():
        recorded = load_config(path)
        # the device and the data location may differ between machines
        where = dataclasses.replace(
            recorded.data, data_dir=cfg.data.data_dir, download=cfg.data.download
        )
        if dataclasses.replace(recorded, device=cfg.device, data=where) != cfg:
            raise ValueError(
                f"{out} holds a run with another configuration ({path}); use another "
                "output directory, or remove that one to start afresh"
            )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_results(out: Path) -> dict[str, Any]:
    path = out / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"stages": {}}


def _write_json(path: Path, obj: Any) -> None:
    _write_atomically(path, json.dumps(obj, indent=2) + "\n")


def _load_data(cfg: RunConfig) -> tuple[Data, Callable[[Tensor, torch.Generator], Tensor] | None]:
    from bbdrop.data import load_dataset

    ds = load_dataset(cfg.data.name, data_dir=cfg.data.data_dir, download=cfg.data.download)
    return ds, getattr(ds, "train_transform", None)


@dataclass
class _Moved:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int


def hold_out(data: Data, n: int) -> Data:
    """``data`` with its last ``n`` training examples as the evaluation set.

    The test set is left out entirely, so settings chosen on the result have
    not seen it. Fashion-MNIST's and MNIST's training files are not ordered by
    class, so the last examples are a fair sample.
    """
    total = data.train_x.shape[0]
    if not 0 < n < total:
        raise ValueError(
            f"data.validation={n}: must leave training examples; the training set has {total}"
        )
    return _Moved(
        data.train_x[:-n], data.train_y[:-n], data.train_x[-n:], data.train_y[-n:],
        data.num_classes,
    )  # fmt: skip


def _to_device(data: Data, device: torch.device) -> Data:
    return _Moved(
        data.train_x.to(device), data.train_y.to(device), data.test_x.to(device),
        data.test_y.to(device), data.num_classes,
    )  # fmt: skip
