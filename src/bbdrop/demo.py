"""The README's main job: dense, then BB, then DBB on scikit-learn's 8x8 digits.

A small multilayer perceptron (64-128-64-10) is trained densely, then
sparsified with beta-Bernoulli dropout starting from the dense weights, then
with dependent beta-Bernoulli dropout with the BB posterior frozen (the
paper's two-stage scheme). The digits ship inside scikit-learn, so this runs
offline in well under a minute on two CPU cores.

This module computes and returns; :mod:`bbdrop.cli` prints.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bbdrop.attach import (
    active_units,
    attach_gates_,
    convert_gates_,
    units_kept,
)
from bbdrop.config import OptimConfig
from bbdrop.train.loop import Progress, evaluate, train_stage

__all__ = ["DemoConfig", "StageResult", "digits_split", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; the optimiser follows SPEC.md section 3."""

    seed: int = 0
    hidden: tuple[int, int] = (128, 64)
    dense_epochs: int = 100
    bb_epochs: int = 200
    dbb_epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    gate_lr: float = 1e-2
    weight_decay: float = 1e-4
    test_fraction: float = 0.2
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("dense_epochs", "bb_epochs", "dbb_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")


@dataclass
class StageResult:
    """What one stage achieved on the held-out digits."""

    stage: str
    error: float  # test error, percent
    units: dict[str, float]  # units kept per gated layer (DBB: average active per example)
    seconds: float
    kept: dict[str, int] = field(default_factory=dict)  # units no input can switch on


def digits_split(seed: int, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits, pixels scaled to [0, 1], stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    to_x = lambda a: torch.as_tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    to_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return to_x(x_tr), to_y(y_tr), to_x(x_te), to_y(y_te)


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (m, n) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(m, n))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _fit(
    model: nn.Module,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    epochs: int,
    cfg: DemoConfig,
    stage: str,
    generator: torch.Generator,
    progress: Progress | None,
) -> None:
    x, y, x_te, y_te = data
    optim = OptimConfig(batch_size=cfg.batch_size, lr=cfg.lr, gate_lr=cfg.gate_lr,
                        weight_decay=cfg.weight_decay)  # fmt: skip

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for i in range(0, x.shape[0], cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            yield x[idx], y[idx]

    train_stage(model, stage, batches, x.shape[0], (x_te, y_te), optim, epochs, None,
                generator, progress)  # fmt: skip


def run_demo(cfg: DemoConfig | None = None, progress: Progress | None = None) -> list[StageResult]:
    """Train dense, BB and DBB on the digits; return one :class:`StageResult` per stage."""
    cfg = cfg or DemoConfig()
    torch.set_flush_denormal(True)  # see bbdrop.train.loop.train_stage
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    x_tr, y_tr, x_te, y_te = (t.to(cfg.device) for t in digits_split(cfg.seed, cfg.test_fraction))
    sizes = (x_tr.shape[1], *cfg.hidden, 10)
    results = []

    dense = mlp(sizes).to(cfg.device)
    t0 = time.perf_counter()
    data = (x_tr, y_tr, x_te, y_te)
    _fit(dense, data, cfg.dense_epochs, cfg, "dense", generator, progress)
    widths = {str(2 * i): float(m) for i, m in enumerate(sizes[:-1])}
    results.append(
        StageResult(
            "dense",
            evaluate(dense, x_te, y_te),
            widths,
            time.perf_counter() - t0,
            {k: int(v) for k, v in widths.items()},
        )
    )

    bb = attach_gates_(copy.deepcopy(dense), "bb")
    t0 = time.perf_counter()
    _fit(bb, data, cfg.bb_epochs, cfg, "bb", generator, progress)
    kept = units_kept(bb)
    results.append(
        StageResult(
            "bb",
            evaluate(bb, x_te, y_te),
            {k: float(v) for k, v in kept.items()},
            time.perf_counter() - t0,
            kept,
        )
    )

    dbb = convert_gates_(copy.deepcopy(bb), "dbb", freeze_bb=True)
    t0 = time.perf_counter()
    _fit(dbb, data, cfg.dbb_epochs, cfg, "dbb", generator, progress)
    seconds = time.perf_counter() - t0
    error = evaluate(dbb, x_te, y_te)
    results.append(StageResult("dbb", error, active_units(dbb), seconds, units_kept(dbb)))
    return results
