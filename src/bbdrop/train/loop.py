"""One training stage: epochs of the variational objective, evaluation, checkpoints, resume.

The objective per minibatch is docs/method.md section 1's::

    mean cross-entropy + (1/N) * sum over gates of kl_scale * KL   (+ weight decay in Adam)

with the authors' optimiser (docs/method.md section 4, :mod:`bbdrop.train.optimizer`):
Adam with two parameter groups (gate parameters at ``gate_lr`` without weight decay,
weights at ``lr`` with ``weight_decay``) and MultiStepLR multiplying both by ``gamma``
at the given fractions of the stage's epochs. An epoch whose loss or weights stop
being finite ends the stage (:mod:`bbdrop.train.divergence`).

After every epoch the stage writes a checkpoint atomically (model, optimiser,
scheduler, random number generators, history); :func:`train_stage` called
again with the same checkpoint path continues after the last completed epoch,
and on the CPU gives bit-for-bit the same result as a run that was never
interrupted. By default a stage flushes denormal floats to zero in every
thread that computes (:func:`bbdrop.train.denormals.flush_denormals`): eight
times faster epochs late in training, and the same mode in all threads, so
that how a parallel operation treats denormals does not depend on which
thread computes which part, nor on what ran before in the process. (Results
may still differ between thread counts, as parallel sums split differently;
each stage records its thread count.)

``compile=True`` runs the training objective through ``torch.compile``
(inductor); evaluation stays eager.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.attach import (
    active_units,
    gated_layers,
    reset_active_units,
    total_kl,
    units_kept,
)
from bbdrop.config import OptimConfig
from bbdrop.data.batches import BatchIterator
from bbdrop.distributed import (
    World,
    all_mean,
    batch_shard,
    fresh_compile,
    init_from_env,
    main_only,
    shard,
)
from bbdrop.gates.base import Gate
from bbdrop.precision import autocast, check_precision, grad_scaler
from bbdrop.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from bbdrop.train.denormals import flush_denormals as set_denormals
from bbdrop.train.divergence import DivergenceError, _check_diverged
from bbdrop.train.optimizer import build_optimizer

__all__ = [
    "CompileError",
    "DivergenceError",
    "EpochRecord",
    "build_optimizer",
    "evaluate",
    "train_stage",
]

Batches = Iterable[tuple[Tensor, Tensor]]  # one epoch of (x, y) minibatches per iteration
Progress = Callable[[str, "EpochRecord", int], None]  # (stage, record, epochs)


@dataclass
class EpochRecord:
    """What one epoch did: training averages, then test figures after the epoch."""

    epoch: int
    loss: float
    cross_entropy: float
    kl: float
    error: float  # test error, percent
    units: dict[str, int]  # units kept per gated layer
    active: dict[str, float]  # DBB: average active units per test example
    seconds: float  # training time of the epoch (evaluation excluded)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Test error in percent with the deterministic test-time gates.

    Resets the DBB running averages first, so that afterwards
    :func:`bbdrop.active_units` describes exactly this data.
    """
    if x.shape[0] == 0:
        raise ValueError("nothing to evaluate on: the evaluation set has 0 examples")
    model.eval()
    reset_active_units(model)
    wrong = 0
    for xb, yb in BatchIterator(x, y, batch_size):  # in order, no augmentation
        wrong += int((model(xb).argmax(dim=-1) != yb).sum())
    return 100.0 * wrong / max(1, x.shape[0])


class CompileError(RuntimeError):
    """``torch.compile`` could not build the training step on this machine."""


def _objective(
    model: nn.Module,
    num_train: int,
    compile: bool,
    precision: str = "float32",
    forward: nn.Module | None = None,
) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """``(x, y, weight=1.0) -> (loss, cross-entropy, regulariser)``, compiled on request;
    the forward pass (through ``forward``, e.g. the DDP wrapper of ``model``) in
    ``precision`` (:mod:`bbdrop.precision`), the loss terms in float32. ``weight``
    multiplies the cross-entropy: a rank's share of the batch (:mod:`bbdrop.distributed`)."""
    gated = any(True for _ in gated_layers(model))
    forward = model if forward is None else forward

    def objective(x: Tensor, y: Tensor, weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        with autocast(precision, x.device):
            logits = forward(x)
        ce = nn.functional.cross_entropy(logits.float(), y)
        if weight != 1.0:
            ce = ce * weight
        kl = total_kl(model) if gated else ce.new_zeros(())
        return ce + kl / num_train, ce, kl

    return torch.compile(objective) if compile else objective


def _is_build_failure(err: Exception) -> bool:
    """Whether ``err`` comes from building compiled code rather than from the model."""
    from torch._dynamo.exc import BackendCompilerFailed

    return isinstance(err, (BackendCompilerFailed, OSError, subprocess.CalledProcessError)) or (
        type(err).__module__.startswith("torch._inductor")
    )


def _compile_error(err: Exception) -> CompileError:
    first = str(err).splitlines()[0] if str(err) else ""
    return CompileError(
        f"torch.compile could not build the training step ({type(err).__name__}: {first}); "
        "it needs a working C++ compiler on the CPU. Run without --compile (compile = false)"
    )


def train_stage(
    model: nn.Module,
    batches: Batches,
    *,
    stage: str,
    epochs: int,
    num_train: int,
    optim: OptimConfig,
    evaluate_on: tuple[Tensor, Tensor],
    checkpoint: str | Path | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    compile: bool = False,
    flush_denormals: bool = True,
    on_start: Callable[[], None] | None = None,
    controller: Controller | None = None,
    precision: str = "float32",
) -> list[EpochRecord]:
    """Train ``model`` for ``epochs`` epochs of ``stage``, resuming from ``checkpoint``.

    Args:
        batches: iterated once per epoch, yields (x, y) minibatches on the model's
            device (e.g. :meth:`bbdrop.data.Dataset.train_batches`); its shuffling
            should draw from ``generator``.
        num_train: N of the KL weight 1/N.
        evaluate_on: (x, y) on which the error is measured after every epoch.
        checkpoint: where to write the checkpoint after every epoch and to resume
            from; None for neither (short runs such as the demo).
        generator: the data-order generator, saved and restored with the global
            torch generator (the gates' noise); None when the order draws from
            the global one.
        compile: run the training objective through ``torch.compile``.
        flush_denormals: flush denormal floats to zero in every computing thread
            of the process (see :mod:`bbdrop.train.denormals`); False leaves the
            process's mode as it is.
        on_start: called once the checkpoint to resume from (if any) has been read
            and checked, before the first epoch.
        controller: steers the training between epochs (:class:`Controller`, e.g.
            :class:`bbdrop.budget.BudgetController`): called after each epoch's record,
            before its checkpoint, which saves the controller's state with the rest.
        precision: ``"float32"``, or the forward passes under autocast in ``"bf16"``
            (CPU, GPU) or ``"fp16"`` (GPU, with a gradient scaler), the gates and the
            loss terms in float32 (:mod:`bbdrop.precision`).
    """
    _check_arguments(epochs, optim, num_train)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    check_precision(precision, device)
    ranks = init_from_env(device)
    fresh_compile(compile, ranks)
    if flush_denormals:
        set_denormals(True)
    opt, sched = build_optimizer(model, optim, epochs)
    run = _Run(
        model=model,
        stage=stage,
        epochs=epochs,
        num_train=num_train,
        optim=optim,
        opt=opt,
        sched=sched,
        objective=_objective(
            model, num_train, compile, precision, _wrapped(model, ranks, device, controller)
        ),
        stepped=_stepped_gates(model),
        compile=compile,
        checkpoint=checkpoint,
        generator=generator,
        controller=controller,
        scaler=grad_scaler(precision, device),
        ranks=ranks,
    )
    history, start = _resume(run)
    if on_start is not None:
        on_start()
    _run_epochs(run, batches, start, evaluate_on, history, progress if ranks.main else None)
    return history


def _wrapped(
    model: nn.Module, ranks: World, device: torch.device, controller: Controller | None
) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` on several ranks (a new wrapper each stage:
    the parameters a stage trains are its own, e.g. after the BB -> DBB conversion),
    ``model`` itself in one process. Under a ``controller`` (a budget's, which freezes
    the gates once the budget is met) DDP looks for parameters without gradients."""
    if ranks.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = None  # the CPU: DDP takes no device
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=ids,
                                   find_unused_parameters=controller is not None)  # fmt: skip


@dataclass
class _Run:
    """What the steps of one :func:`train_stage` call share."""

    model: nn.Module
    stage: str
    epochs: int
    num_train: int
    optim: OptimConfig
    opt: torch.optim.Adam
    sched: torch.optim.lr_scheduler.LambdaLR
    objective: Callable[..., tuple[Tensor, Tensor, Tensor]]
    stepped: list[Gate]  # the gates with a proximal step after each optimiser step
    compile: bool
    checkpoint: str | Path | None
    generator: torch.Generator | None
    controller: Controller | None = None
    scaler: torch.amp.GradScaler | None = None  # float16's gradient scaler
    ranks: World = field(default_factory=World)  # a torchrun's processes (bbdrop.distributed)


class Controller(Protocol):
    """What steers a stage between epochs (``train_stage(controller=...)``)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimiser step (and proximal step), ``step`` counted from 1
        in each epoch; the model is in training mode and must be left so."""

    def after_epoch(self, model: nn.Module, record: EpochRecord, epochs: int) -> None:
        """Called after epoch ``record.epoch`` of ``epochs`` is recorded, before its
        checkpoint is written."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed stage needs (numbers, lists, dicts): saved in the checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result, when the stage resumes."""


def _check_arguments(epochs: int, optim: OptimConfig, num_train: int) -> None:
    """ValueError or TypeError for arguments :func:`train_stage` cannot train with."""
    validate.whole("epochs", epochs, lo=1)
    if not isinstance(optim, OptimConfig):
        raise TypeError(f"optim must be a bbdrop.config.OptimConfig, got {type(optim).__name__}")
    if not validate.is_whole(num_train):
        raise TypeError(f"num_train must be an int, got {num_train!r}")
    if num_train < 1:
        raise ValueError(
            f"num_train (the training examples, N of the KL weight 1/N) must be >= 1, got "
            f"{num_train!r}: the training set is empty"
        )


def _stepped_gates(model: nn.Module) -> list[Gate]:
    """The gates whose class declares ``steps_after_optimiser``: those that override
    :meth:`Gate.after_step` (a proximal step)."""
    return [m for m in model.modules() if isinstance(m, Gate) and m.steps_after_optimiser]


def _resume(run: _Run) -> tuple[list[EpochRecord], int]:
    """Restore model, optimiser, scheduler and random states from the in-progress
    checkpoint, if there is one; the history so far and the epoch to start from."""
    checkpoint = run.checkpoint
    if checkpoint is None or not Path(checkpoint).exists():
        return [], 0
    state = load_checkpoint(checkpoint)
    if state.get("stage") != run.stage or state.get("epochs") != run.epochs:
        raise ValueError(
            f"{checkpoint} holds stage {state.get('stage')!r} of {state.get('epochs')} "
            f"epochs, not {run.stage!r} of {run.epochs}; delete it to start the stage afresh"
        )
    load_model_state(run.model, state, checkpoint)
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    set_rng(state["rng"], run.generator)
    if run.controller is not None:
        run.controller.load_state_dict(state.get("controller", {}))
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    return [EpochRecord(**r) for r in state["history"]], state["epoch"]


def _run_epochs(
    run: _Run,
    batches: Batches,
    start: int,
    evaluate_on: tuple[Tensor, Tensor],
    history: list[EpochRecord],
    progress: Progress | None,
) -> None:
    """Epochs ``start`` to the last of the stage: each trained, then finished
    (:func:`_finish_epoch`: appended to ``history``) and reported to ``progress``."""
    x_eval, y_eval = evaluate_on
    for epoch in range(start, run.epochs):
        averages, seconds = _train_epoch(run, batches, epoch, first=epoch == start)
        record = _finish_epoch(run, epoch, averages, seconds, (x_eval, y_eval), history)
        if progress is not None:
            progress(run.stage, record, run.epochs)


def _train_epoch(
    run: _Run, batches: Batches, epoch: int, *, first: bool
) -> tuple[tuple[float, float, float], float]:
    """One epoch of optimiser steps, then the scheduler's step: the epoch's average
    (loss, cross-entropy, KL) and its training time in seconds. ``first``: the first
    epoch of this call, whose first step compiles (``compile=True``)."""
    model, opt = run.model, run.opt
    model.train()
    t0 = time.perf_counter()
    sums = None  # summed on the device, read once per epoch (no per-step sync)
    steps = 0
    for x, y in batches:
        if x.shape[0] == 0:
            raise ValueError(
                f"batch {steps + 1} of epoch {epoch + 1} has 0 examples; the batches must "
                "hold at least one (check the iterator's batch size and drop_last)"
            )
        rows, weight = None, 1.0
        if run.ranks.size > 1:  # this rank's share; its cross-entropy weighted by it
            x, y, rows = shard(x, y, run.ranks)
            weight = (rows[1] - rows[0]) * run.ranks.size / rows[2]
        opt.zero_grad(set_to_none=True)
        try:
            with batch_shard(rows):
                loss, ce, kl = run.objective(x, y, weight)
            (loss if run.scaler is None else run.scaler.scale(loss)).backward()
        except Exception as err:  # the first step compiles forward and backward
            if run.compile and first and steps == 0 and _is_build_failure(err):
                raise _compile_error(err) from err
            raise
        if run.scaler is None:
            opt.step()
        else:  # skips the step when the scaled gradients overflowed
            run.scaler.step(opt)
            run.scaler.update()
        for gate in run.stepped:  # proximal steps of the methods that have one
            gate.after_step(opt.param_groups[0]["lr"], run.num_train)
        terms = torch.stack([loss.detach(), ce.detach(), kl.detach()])
        sums = terms if sums is None else sums + terms
        steps += 1
        if run.controller is not None:
            run.controller.after_step(model, steps)
    run.sched.step()
    seconds = time.perf_counter() - t0
    if sums is None:
        raise ValueError(f"the batches of epoch {epoch + 1} were empty")
    sums = all_mean(sums)  # the ranks' weighted shares: the global batches' averages
    loss_avg, ce_avg, kl_avg = (sums.double() / steps).tolist()
    return (loss_avg, ce_avg, kl_avg), seconds


def _finish_epoch(
    run: _Run,
    epoch: int,
    averages: tuple[float, float, float],
    seconds: float,
    evaluate_on: tuple[Tensor, Tensor],
    history: list[EpochRecord],
) -> EpochRecord:
    """The end of an epoch: the divergence check, the evaluation, the epoch's record
    (appended to ``history``) and the checkpoint."""
    model = run.model
    loss_avg, ce_avg, kl_avg = averages
    x_eval, y_eval = evaluate_on
    _check_diverged(
        model, run.stage, epoch + 1, (loss_avg, ce_avg), x_eval, run.optim, run.checkpoint
    )
    error = evaluate(model, x_eval, y_eval)
    record = EpochRecord(
        epoch + 1,
        loss_avg,
        ce_avg,
        kl_avg,
        error,
        units_kept(model),
        active_units(model),
        seconds,
    )
    history.append(record)
    if run.controller is not None:
        run.controller.after_epoch(model, record, run.epochs)
    if run.checkpoint is not None:  # under torchrun, rank 0 writes; the others wait
        main_only(lambda: save_checkpoint(
            {
                "stage": run.stage,
                "epochs": run.epochs,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": run.opt.state_dict(),
                "scheduler": run.sched.state_dict(),
                "rng": get_rng(run.generator),
                "history": [r.to_dict() for r in history],
                **({} if run.controller is None else {"controller": run.controller.state_dict()}),
                **({} if run.scaler is None else {"scaler": run.scaler.state_dict()}),
            },
            run.checkpoint,
        ))
    return record


def get_rng(generator: torch.Generator | None) -> dict[str, Any]:
    """The random states a run depends on: torch's (the gates' noise), the data order's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if generator is not None:
        state["data"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    """Restore what :func:`get_rng` saved."""
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded onto CUDA holds them there
    if generator is not None and "data" in state:
        generator.set_state(state["data"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
