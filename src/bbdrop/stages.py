"""The stages of a run and the gates a :class:`~bbdrop.config.RunConfig` gives each.

A run is a sequence of :class:`Stage` entries (:func:`pipeline_stages`): dense
pretraining, the sparsification stage of the method named by ``gate.method``,
the DBB stage built on it (BB frozen), and pre-pruning, the DBB stage's
after-step. :func:`stage_model` builds a fresh network with a stage's gates (to
load its checkpoint), and :func:`resolve_device` turns ``cfg.device`` into a
torch device.

This module only maps a configuration to networks; running the stages is
:mod:`bbdrop.pipeline`'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bbdrop.attach import (
    attach_gates_,
    convert_gates_,
    gated_layers,
    prune_units_,
    units_ever_active,
)
from bbdrop.config import RunConfig
from bbdrop.data import Dataset

__all__ = ["STAGES", "Stage", "pipeline_stages", "placement", "resolve_device", "stage_model"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available; a clear error for a CUDA device torch does not see."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(
                f"device {name!r} asked for, but torch sees {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    return device


# -- the stages -------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One step of a run.

    Attributes:
        name: the step's checkpoint (``<name>.pt``) and its key in the results.
        epochs: its epochs under a configuration; 0 skips the stage.
        setup: gives the model the stage's gates, in place, before it trains (and
            before a checkpoint of the stage is loaded into a fresh network):
            ``setup(model, cfg, example)``, ``example`` a batch of the data's inputs
            (the group placement traces the network on it) or None.
        train: whether the stage trains; one that does not runs ``after`` only.
        after: what is done to the model after training (or instead of it), before
            the stage's figures are taken: ``after(model, dataset)``.
    """

    name: str
    epochs: Callable[[RunConfig], int]
    setup: Callable[[nn.Module, RunConfig, Tensor | None], None] | None = None
    train: bool = True
    after: Callable[[nn.Module, Dataset], None] | None = None


def placement(cfg: RunConfig) -> str:
    """Where ``cfg``'s gates go: ``gate.placement``, with ``"auto"`` resolved to the paper's
    ``"layers"`` for a registered network and ``"groups"`` for a factory of the user's
    own (a residual network's streams need one gate per coupled group)."""
    from bbdrop.factories import is_factory

    if cfg.gate.placement != "auto":
        return cfg.gate.placement
    return "groups" if is_factory(cfg.model.name) else "layers"


def _attach_method(model: nn.Module, cfg: RunConfig, example: Tensor | None) -> None:
    """Attach the gates of ``gate.method`` with its settings from [gate] (checked against
    the method's settings when the configuration was read: :meth:`GateConfig.method_kwargs`),
    where :func:`placement` puts them; the group placement traces ``example``."""
    g = cfg.gate
    kwargs = g.method_kwargs()
    if placement(cfg) == "groups":
        if example is None:
            raise ValueError(
                "the gates of gate.placement = groups are placed by tracing the network on "
                "a batch of its inputs, and none was given (stage_model(..., example=x))"
            )
        attach_gates_(model, g.method, example=example, placement="groups",
                      conv_kl_scale=g.conv_kl_scale, **kwargs)  # fmt: skip
    else:
        attach_gates_(model, g.method, conv_kl_scale=g.conv_kl_scale, **kwargs)
    layers = dict(gated_layers(model))
    for name, scale in g.layer_kl_scale.items():
        if name not in layers:
            raise ValueError(
                f"gate.layer_kl_scale.{name}: no gated layer of that name; the gated layers "
                f"of {cfg.model.name!r}: {', '.join(layers)}"
            )
        layers[name].gate.kl_scale = float(scale)


def _to_dbb(model: nn.Module, cfg: RunConfig, example: Tensor | None = None) -> None:
    convert_gates_(model, "dbb", freeze_bb=True, kl_scale=cfg.gate.dbb_kl_scale)


def _preprune(model: nn.Module, data: Dataset) -> None:
    """Remove for good the units that no training example switches on."""
    prune_units_(model, units_ever_active(model, data.train_x))


def pipeline_stages(cfg: RunConfig) -> tuple[Stage, ...]:
    """The stages of a run of ``cfg``, in order; those with 0 epochs are left out."""
    table = (
        Stage("pretrain", lambda c: c.epochs.pretrain),
        Stage(cfg.gate.method, lambda c: c.epochs.sparsify, setup=_attach_method),
        Stage("dbb", lambda c: c.epochs.dbb, setup=_to_dbb),
        Stage("preprune", lambda c: 1 if c.epochs.dbb else 0, train=False, after=_preprune),
    )
    stages = tuple(s for s in table if s.epochs(cfg) > 0)
    if not stages:
        raise ValueError("every stage has 0 epochs: nothing to run (set epochs.pretrain, ...)")
    if cfg.epochs.dbb and not cfg.epochs.sparsify:
        raise ValueError(
            "epochs.dbb > 0 needs the sparsification stage it starts from: set "
            "epochs.sparsify > 0, or epochs.dbb = 0"
        )
    if cfg.epochs.dbb and cfg.gate.method == "dbb":
        raise ValueError(
            'gate.method = "dbb" with epochs.dbb > 0 would train DBB twice; the DBB stage '
            'starts from gate.method = "bb"'
        )
    return stages


STAGES = tuple(s.name for s in pipeline_stages(RunConfig()))  # the default run's stages


def stage_model(
    cfg: RunConfig, stage: str, num_classes: int, example: Tensor | None = None
) -> nn.Module:
    """A freshly built network with the structure of ``stage`` (to load its checkpoint):
    ``cfg.model.name``, a registered network or a factory of the user's own
    (``module.path:attribute``, :mod:`bbdrop.factories`), built for ``num_classes``.
    ``example``: a batch of the data's inputs, which the group placement traces."""
    from bbdrop.factories import build_model

    table = pipeline_stages(cfg)
    names = [s.name for s in table]
    if stage not in names:
        raise ValueError(f"unknown stage {stage!r}; stages of {cfg.name!r}: {', '.join(names)}")
    model = build_model(cfg.model.name, num_classes)
    for s in table[: names.index(stage) + 1]:
        if s.setup is not None:
            s.setup(model, cfg, example)
    return model
