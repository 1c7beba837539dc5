"""The README's main job: dense, then BB, then DBB on scikit-learn's 8x8 digits.

A small multilayer perceptron (64-128-64-10) is trained densely, then
sparsified with beta-Bernoulli dropout starting from the dense weights, then
with dependent beta-Bernoulli dropout with the BB posterior frozen (the
paper's two-stage scheme). The digits ship inside scikit-learn, so this runs
offline in well under a minute on two CPU cores. The data go through the same
path as every run: ``load_dataset("digits")`` and its batch iterator.

This module computes and returns; :mod:`bbdrop.cli` prints.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from bbdrop.attach import (
    active_units,
    attach_gates_,
    convert_gates_,
    units_kept,
)
from bbdrop.config import MAX_SEED, OptimConfig
from bbdrop.data import Dataset, load_dataset
from bbdrop.threads import num_threads
from bbdrop.train.loop import Progress, evaluate, train_stage

__all__ = ["DemoConfig", "StageResult", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; the optimiser follows docs/method.md section 4."""

    seed: int = 0
    hidden: tuple[int, int] = (128, 64)
    dense_epochs: int = 100
    bb_epochs: int = 200
    dbb_epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    gate_lr: float = 1e-2
    weight_decay: float = 1e-4
    device: str = "cpu"
    threads: int = 1  # the MLP's operations are too short to share (bbdrop.threads)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {self.threads!r}")
        for name in ("dense_epochs", "bb_epochs", "dbb_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class StageResult:
    """What one stage achieved on the held-out digits."""

    stage: str
    error: float  # test error, percent
    units: dict[str, float]  # units kept per gated layer (DBB: average active per example)
    seconds: float
    kept: dict[str, int] = field(default_factory=dict)  # units no input can switch on


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """An MLP on flattened images: Flatten, then Linear/ReLU layers of ``sizes``."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (m, n) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(m, n))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _fit(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    cfg: DemoConfig,
    stage: str,
    generator: torch.Generator,
    progress: Progress | None,
) -> float:
    """Train one stage; its seconds."""
    optim = OptimConfig(
        batch_size=cfg.batch_size, lr=cfg.lr, gate_lr=cfg.gate_lr, weight_decay=cfg.weight_decay
    )
    t0 = time.perf_counter()
    train_stage(
        model,
        data.train_batches(cfg.batch_size, generator),
        stage=stage,
        epochs=epochs,
        num_train=data.train_x.shape[0],
        optim=optim,
        evaluate_on=(data.test_x, data.test_y),
        generator=generator,
        progress=progress,
    )
    return time.perf_counter() - t0


def run_demo(cfg: DemoConfig | None = None, progress: Progress | None = None) -> list[StageResult]:
    """Train dense, BB and DBB on the digits; return one :class:`StageResult` per stage."""
    cfg = cfg or DemoConfig()
    with num_threads(cfg.threads):
        return _run_demo(cfg, progress)


def _run_demo(cfg: DemoConfig, progress: Progress | None) -> list[StageResult]:
    data = load_dataset("digits").to(cfg.device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    sizes = (data.train_x[0].numel(), *cfg.hidden, data.num_classes)
    x_te, y_te = data.test_x, data.test_y

    dense = mlp(sizes).to(cfg.device)
    seconds = _fit(dense, data, cfg.dense_epochs, cfg, "dense", generator, progress)
    widths = {str(2 * i + 1): m for i, m in enumerate(sizes[:-1])}  # the Linear layers' names
    results = [
        StageResult(
            "dense",
            evaluate(dense, x_te, y_te),
            {k: float(v) for k, v in widths.items()},
            seconds,
            widths,
        )
    ]

    bb = attach_gates_(copy.deepcopy(dense), "bb")
    seconds = _fit(bb, data, cfg.bb_epochs, cfg, "bb", generator, progress)
    kept = units_kept(bb)
    results.append(
        StageResult(
            "bb", evaluate(bb, x_te, y_te), {k: float(v) for k, v in kept.items()}, seconds, kept
        )
    )

    dbb = convert_gates_(copy.deepcopy(bb), "dbb", freeze_bb=True)
    seconds = _fit(dbb, data, cfg.dbb_epochs, cfg, "dbb", generator, progress)
    error = evaluate(dbb, x_te, y_te)
    results.append(StageResult("dbb", error, active_units(dbb), seconds, units_kept(dbb)))
    return results
