"""The optimiser of a training stage and its learning-rate schedule: the authors'
(docs/method.md section 4), Adam with two parameter groups (gate parameters at
``gate_lr`` without weight decay, weights at ``lr`` with ``weight_decay``) and a
step schedule multiplying both by ``gamma`` at given fractions of the stage's
epochs; :func:`bbdrop.train.loop.train_stage` steps them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bbdrop.config import OptimConfig
from bbdrop.gates.base import Gate

__all__ = ["build_optimizer", "param_groups"]


def build_optimizer(
    model: nn.Module, optim: OptimConfig, epochs: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam with the gate and weight parameter groups, and the step schedule.

    The learning rates are multiplied by ``gamma`` from epoch ``int(m * epochs)``
    on for each milestone fraction m (the authors' ``int``; the scheduler steps
    once per epoch), like MultiStepLR; a milestone that would fall on epoch 0 is
    moved to epoch 1, so that no stage starts decayed. With
    ``decay_gates=False`` the gate group keeps its rate. Parameters that do not
    require gradients (a frozen BB posterior) are left out.
    """
    groups = param_groups(
        model, lr=optim.lr, gate_lr=optim.gate_lr, weight_decay=optim.weight_decay
    )
    gates = len(groups) > 1
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups, **_fused_if_supported(trainable))
    milestones = sorted({max(1, int(m * epochs)) for m in optim.milestones})

    def step_decay(epoch: int) -> float:
        return optim.gamma ** sum(epoch >= m for m in milestones)

    lambdas = [step_decay] + ([step_decay if optim.decay_gates else _constant] if gates else [])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def param_groups(
    model: nn.Module, *, lr: float = 1e-3, gate_lr: float = 1e-2, weight_decay: float = 1e-4
) -> list[dict[str, Any]]:
    """The optimiser's parameter groups of a gated ``model`` (docs/method.md section 4):
    the weights at ``lr`` with ``weight_decay``, the gates' parameters at ``gate_lr``
    without (none for a network without gates). Parameters that do not require
    gradients (a frozen BB posterior) are left out::

        opt = torch.optim.Adam(bbdrop.param_groups(net))
    """
    gate_ids = {
        id(p) for m in model.modules() if isinstance(m, Gate) for p in m.parameters(recurse=False)
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{
        "params": [p for p in trainable if id(p) not in gate_ids],
        "lr": lr,
        "weight_decay": weight_decay,
    }]  # fmt: skip
    gates = [p for p in trainable if id(p) in gate_ids]
    if gates:
        groups.append({"params": gates, "lr": gate_lr, "weight_decay": 0.0})
    return groups


def _constant(epoch: int) -> float:
    return 1.0


def _fused_if_supported(params: list[Tensor]) -> dict[str, bool]:
    """One fused Adam kernel instead of a dozen operations per parameter, where torch has it
    (CUDA since 2.0, CPU since 2.4)."""
    if not params or not all(p.dtype in (torch.float32, torch.float64) for p in params):
        return {}
    device = params[0].device.type
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if device == "cuda" or (device == "cpu" and (major, minor) >= (2, 4)):
        return {"fused": True}
    return {}
