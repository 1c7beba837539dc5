"""The recipe in one call: :func:`sparsify` takes a trained network and its data and
returns the network with its gates trained and the smaller network they give.

What a user otherwise writes by hand (docs/sparsify.md): the gates attached by coupled
group (:func:`bbdrop.attach_gates_`), the optimiser's two parameter groups
(:func:`param_groups`), the objective ``cross-entropy + total_kl / N`` with N counted
from the data, the stages (DBB: BB first, then DBB from the BB posterior, frozen),
a checkpoint after every epoch that a second call resumes from, the divergence guard
(:func:`bbdrop.train.loop.train_stage` does both), then compaction and the costs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.attach import attach_gates_, convert_gates_, gated_layers, units_kept
from bbdrop.budget import (
    Budget,
    BudgetController,
    after_the_path,
    as_budget,
    check_budget,
    settle_,
    stage_goals,
)
from bbdrop.compaction import compact
from bbdrop.config import OptimConfig
from bbdrop.data.batches import BatchIterator
from bbdrop.distributed import init_from_env, main_only
from bbdrop.files import atomic_file
from bbdrop.gates.base import get_gate_class
from bbdrop.heads import AttentionHeads
from bbdrop.metrics import latencies, network_costs
from bbdrop.precision import check_precision
from bbdrop.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from bbdrop.train.loop import EpochRecord, evaluate, train_stage
from bbdrop.train.optimizer import param_groups

__all__ = ["Report", "Sparsified", "param_groups", "sparsify"]

SETTINGS = "sparsify.json"  # a checkpoint_dir's record of the call that made it
EVAL_EXAMPLES = 1000  # training examples to watch the error on, when no val is given
RECALIBRATION_EXAMPLES = 2000  # training examples that re-estimate the batch norms' statistics
LATENCY_BATCH = 64


@dataclass
class Report:
    """What :func:`sparsify` measured. Errors in percent on ``val`` (None without it);
    FLOPs (matrix products and convolutions) and parameters per example of the dense
    network and of the compacted one (:func:`bbdrop.network_costs`); latencies in
    milliseconds at batch 64, measured against each other (:func:`bbdrop.metrics.latencies`)."""

    method: str
    dense_error: float | None
    error: float | None  # the compacted network's (equal to the gated one's, in eval)
    units: dict[str, int]  # kept per gate
    widths: dict[str, int]  # each gate's units before
    dense_flops: int
    flops: int
    expected_flops: float  # DBB: skipping the units switched off per example
    dense_parameters: int
    parameters: int
    dense_ms: float
    compact_ms: float
    history: dict[str, list[EpochRecord]] = field(default_factory=dict, repr=False)
    budget: Budget | None = None  # what was asked for
    # per stage, after each epoch: the cost, where the path wanted it, the scales' factor
    steering: dict[str, list[dict[str, float]]] = field(default_factory=dict, repr=False)
    settled: int = 0  # units the budget removed past the method's own rule, at the end

    @property
    def cost(self) -> float:
        """The compacted network's FLOPs (DBB: expected) over the dense network's."""
        return self.expected_flops / self.dense_flops

    @property
    def param_cost(self) -> float:
        """The compacted network's parameters over the dense network's."""
        return self.parameters / self.dense_parameters

    @property
    def speedup(self) -> float:
        """FLOP speedup of the compacted network (with run-time skipping for DBB)."""
        return self.dense_flops / max(self.expected_flops, 1.0)

    @property
    def measured_speedup(self) -> float:
        return self.dense_ms / self.compact_ms

    def __str__(self) -> str:
        def err(e: float | None) -> str:
            return "-" if e is None else f"{e:.2f}%"

        lines = [
            f"{'':10} {'error':>8} {'FLOPs':>12} {'params':>10} {'ms @64':>8}",
            f"{'dense':10} {err(self.dense_error):>8} {self.dense_flops:>12} "
            f"{self.dense_parameters:>10} {self.dense_ms:>8.2f}",
            f"{self.method:10} {err(self.error):>8} {round(self.expected_flops):>12} "
            f"{self.parameters:>10} {self.compact_ms:>8.2f}",
            f"FLOP speedup {self.speedup:.2f}x, measured {self.measured_speedup:.2f}x; units kept: "
            + ", ".join(f"{n} {self.units[n]}/{self.widths[n]}" for n in self.units),
        ]
        if self.budget is not None:
            reached = [f"{v:.4g}" for v, asked in ((self.cost, self.budget.flops),
                       (self.param_cost, self.budget.params)) if asked is not None]  # fmt: skip
            lines.append(
                f"budget {self.budget}: reached {' and '.join(reached)}; "
                f"{self.settled} unit(s) removed past the method's own rule at the end"
            )
        return "\n".join(lines)


@dataclass
class Sparsified:
    """:func:`sparsify`'s result: the network with its trained gates (``gated``), the
    smaller network they give (``compact``, what to deploy), and the ``report``."""

    gated: nn.Module
    compact: nn.Module
    report: Report


def sparsify(
    model: nn.Module,
    train: Any,
    *,
    method: str = "bb",
    val: Any = None,
    budget: float | Budget | None = None,
    epochs: int = 10,
    dbb_epochs: int | None = None,
    batch_size: int = 100,
    optim: OptimConfig | None = None,
    example: Tensor | None = None,
    heads: Sequence[AttentionHeads] = (),
    placement: str | None = None,
    checkpoint_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
    precision: str = "float32",
    **gate_kwargs: Any,
) -> Sparsified:
    """Sparsify a trained ``model`` with ``method`` on ``train``: gates on its coupled
    groups, trained with the variational objective, then compacted.

    Args:
        model: the trained network; not changed (the gates go on a copy).
        train: the training data: ``(x, y)`` tensors, a ``torch.utils.data.Dataset`` of
            ``(x, y)`` pairs, or a ``DataLoader`` of ``(x, y)`` batches. N, the KL
            term's divisor, is its number of examples.
        method: a registered method (:func:`bbdrop.list_gates`); ``"dbb"`` trains BB
            for ``epochs``, then DBB from that posterior (frozen) for ``dbb_epochs``.
        val: held-out data in the same forms, on which the errors are reported and
            watched after every epoch (without it, the error on the first 1000
            training examples is watched and none is reported).
        budget: the fraction of the dense network's FLOPs to end at (0.125: 8x
            fewer): the network is pruned along a path to it, the method's strength
            steered to carry the pruning (:mod:`bbdrop.budget`). For ``"dbb"``, the
            expected FLOPs with run-time skipping: the BB stage ends at 1.4 times the
            budget, and the DBB stage's strength is steered to bring the expected
            cost down to it. ``bbdrop.Budget(params=0.1)`` asks for a fraction of the
            parameters instead, ``Budget(flops=..., params=...)`` for both (the BB
            stage meets a parameter budget; DBB's skipping changes no parameter).
            None: the method's own strength decides (``kl_scale``).
        epochs: epochs of the method's stage (BB's, for DBB).
        dbb_epochs: epochs of the DBB stage (default: ``epochs``).
        batch_size: examples per step, for tensors and datasets (a DataLoader keeps
            its own).
        optim: the optimiser's settings (:class:`bbdrop.config.OptimConfig`: learning
            rates, weight decay, step decay); default: the authors'.
        example: a batch of inputs to trace the network on (default: the first 8
            training inputs).
        heads: attentions whose heads get gates (:class:`bbdrop.AttentionHeads`).
        placement: ``"groups"`` (default) or the paper's ``"layers"``
            (:func:`bbdrop.attach_gates_`).
        checkpoint_dir: a folder for a checkpoint after every epoch: a second call
            with the same arguments resumes there (bit for bit on the CPU, for
            tensors and datasets), and one with other arguments is refused.
        seed: seeds the data order and the gates' noise.
        progress: print a line per epoch.
        precision: ``"float32"``, or the training's forward passes under autocast in
            ``"bf16"`` (CPU, GPU) or ``"fp16"`` (GPU), the gates in float32
            (:mod:`bbdrop.precision`).
        gate_kwargs: the method's settings (e.g. ``kl_scale=3``), passed to
            :func:`bbdrop.attach_gates_`.

    Returns:
        :class:`Sparsified`: ``gated``, ``compact`` and ``report``.
    """
    get_gate_class(method)  # an unknown method fails before anything else
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    check_precision(precision, device)
    validate.whole("epochs", epochs, lo=1)
    dbb_epochs = epochs if dbb_epochs is None else dbb_epochs
    validate.whole("dbb_epochs", dbb_epochs, lo=1)
    validate.whole("batch_size", batch_size, lo=1)
    optim = optim or OptimConfig(batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    batches, num_train = _batches(train, batch_size, generator)
    held = None if val is None else _tensors(val, "val")  # read once, reported on at the end
    watch = _tensors(train, "train", EVAL_EXAMPLES) if held is None else _first(held, EVAL_EXAMPLES)
    example = watch[0][:8] if example is None else example
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    if budget is not None:
        budget = as_budget(budget)  # a bad one fails here; one out of reach, after attaching
    asked = None if budget is None else (budget.flops if budget.params is None else
                                         {"flops": budget.flops, "params": budget.params})
    settings = {"method": method, "epochs": epochs, "dbb_epochs": dbb_epochs,
                "num_train": num_train, "seed": seed, "budget": asked,
                "gate": {k: repr(v) for k, v in sorted(gate_kwargs.items())},
                **({} if precision == "float32" else {"precision": precision})}  # fmt: skip
    init_from_env(device)
    if folder is not None and _check_folder(folder, settings):  # every rank checks first
        main_only(lambda: _record_settings(folder, settings))
    torch.manual_seed(seed)
    net = copy.deepcopy(model)
    first = "bb" if method == "dbb" else method
    attach_gates_(net, first, example=example, heads=heads, placement=placement, **gate_kwargs)
    if budget is not None:
        budget = check_budget(net, budget, example)
    stages = [(first, epochs)] + ([("dbb", dbb_epochs)] if method == "dbb" else [])
    history: dict[str, list[EpochRecord]] = {}
    steering: dict[str, list[dict[str, float]]] = {}
    goals = {} if budget is None else stage_goals(budget, [stage for stage, _ in stages])
    for stage, count in stages:
        if stage == "dbb":
            convert_gates_(net, "dbb", freeze_bb=True)
        controller = None
        if stage in goals:  # DBB: BB a little above it, DBB's skipping down to it
            start, goal = goals[stage]
            controller = BudgetController(net, goal, example, watch[0], start=start)
        stage_optim = optim if controller is None else after_the_path(optim)
        history[stage] = _stage(net, batches, stage, count, num_train, stage_optim, watch,
                                folder, generator, progress, controller, precision)  # fmt: skip
        if controller is not None:
            steering[stage] = controller.trace
    settled = 0 if budget is None else settle_(net, budget, example, watch[0], fill=True)
    recalibrate_batch_norms(net, _tensors(train, "train", RECALIBRATION_EXAMPLES)[0])
    small, report = _measure(net, model, method, example, held, history)
    report.budget, report.steering, report.settled = budget, steering, settled
    return Sparsified(net, small, report)


def _stage(
    net: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    stage: str,
    epochs: int,
    num_train: int,
    optim: OptimConfig,
    watch: tuple[Tensor, Tensor],
    folder: Path | None,
    generator: torch.Generator,
    progress: bool,
    controller: BudgetController | None = None,
    precision: str = "float32",
) -> list[EpochRecord]:
    """One stage, or its result from ``folder`` when an earlier call finished it."""
    done = None if folder is None else folder / f"{stage}.pt"
    if done is not None and done.exists():
        state = load_checkpoint(done)
        load_model_state(net, state, done)
        if controller is not None:
            controller.load_state_dict(state["controller"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        return [EpochRecord(**r) for r in state["history"]]

    def report(name: str, record: EpochRecord, total: int) -> None:
        print(f"{name} epoch {record.epoch}/{total}: loss {record.loss:.4f}, "
              f"error {record.error:.2f}%, units {sum(record.units.values())}")  # fmt: skip

    history = train_stage(
        net, batches, stage=stage, epochs=epochs, num_train=num_train, optim=optim,
        evaluate_on=watch, generator=generator, progress=report if progress else None,
        checkpoint=None if folder is None else folder / f"{stage}.last.pt",
        controller=controller, precision=precision,
    )  # fmt: skip
    if done is not None:  # under torchrun, rank 0 writes; the others wait
        main_only(lambda: _save_stage(net, generator, history, controller, done))
    return history


def _save_stage(
    net: nn.Module,
    generator: torch.Generator,
    history: list[EpochRecord],
    controller: BudgetController | None,
    done: Path,
) -> None:
    """A finished stage's checkpoint, its in-progress one removed."""
    save_checkpoint({"model": net.state_dict(), "generator": generator.get_state(),
                     "torch": torch.get_rng_state(), "history": [r.to_dict() for r in history],
                     "controller": {} if controller is None else controller.state_dict()},
                    done)  # fmt: skip
    done.with_name(f"{done.stem}.last.pt").unlink(missing_ok=True)


def _measure(
    net: nn.Module,
    model: nn.Module,
    method: str,
    example: Tensor,
    data: tuple[Tensor, Tensor] | None,
    history: dict[str, list[EpochRecord]],
) -> tuple[nn.Module, Report]:
    """The compacted network and the report (errors on ``data``, the held-out set)."""
    net.eval()
    small = compact(net, example)
    costs = network_costs(
        net, example, None if data is None else data[0][:EVAL_EXAMPLES], compacted=small
    )
    timed = example if data is None else data[0][:LATENCY_BATCH]
    dense = copy.deepcopy(model).eval()  # the user's model: its modes are left alone
    times = latencies({"dense": dense, "compact": small}, timed, rounds=5)
    widths = {name: layer.gate.num_units for name, layer in gated_layers(net)}
    report = Report(
        method,
        None if data is None else evaluate(dense, *data),
        None if data is None else evaluate(small, *data),
        units_kept(net),
        widths,
        costs.dense_flops,
        costs.flops,
        costs.expected_flops,
        costs.dense_parameters,
        costs.parameters,
        1000 * times["dense"],
        1000 * times["compact"],
        history,
    )
    return small, report


@torch.no_grad()
def recalibrate_batch_norms(net: nn.Module, x: Tensor, batch_size: int = 250) -> nn.Module:
    """Re-estimate, in place, the running statistics of ``net``'s batch norms on inputs
    ``x``, with its gates at their test-time values: what evaluation and compaction
    will see. In training the gates' noise, and units a budget removed, change what
    each norm receives faster than its running averages follow, and the lag compounds
    through a deep network. Returns ``net``, in eval mode."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    net.eval()
    if not norms or not all(m.track_running_stats for m in norms):
        return net
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
        m.training = True  # the norm alone: a gate on its output (its child) stays in eval
    try:
        for xb in x.split(batch_size):
            net(xb)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.eval()
    return net


# -- data -------------------------------------------------------------------------------
def _batches(
    data: Any, batch_size: int, generator: torch.Generator
) -> tuple[Iterable[tuple[Tensor, Tensor]], int]:
    """Training batches of ``data`` (one epoch per iteration, shuffled from
    ``generator``) and the number of examples."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, DataLoader):
        n = _length(data.dataset, "train")
        return data, n
    if isinstance(data, Dataset):
        n = _length(data, "train")
        return DataLoader(data, batch_size, shuffle=True, generator=generator), n
    x, y = _pair(data, "train")
    return BatchIterator(x, y, batch_size, shuffle=True, generator=generator), len(x)


def _tensors(data: Any, name: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """``data`` (tensors, a Dataset or a DataLoader; the argument ``name``) as two tensors,
    of at most ``limit`` examples."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, DataLoader | Dataset):
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256)
        xs, ys, n = [], [], 0
        for x, y in loader:
            xs.append(x)
            ys.append(y)
            n += len(x)
            if limit is not None and n >= limit:
                break
        return torch.cat(xs)[:limit], torch.cat(ys)[:limit]
    return _first(_pair(data, name), limit)


def _first(data: tuple[Tensor, Tensor], limit: int | None) -> tuple[Tensor, Tensor]:
    return data[0][:limit], data[1][:limit]


def _pair(data: Any, name: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, tuple | list) and len(data) == 2
            and all(isinstance(t, Tensor) for t in data)):  # fmt: skip
        raise TypeError(
            f"{name} must be (x, y) tensors, a torch.utils.data.Dataset of (x, y) pairs or a "
            f"DataLoader of (x, y) batches; got {type(data).__name__}"
        )
    x, y = data
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{name} has {len(x)} inputs and {len(y)} labels: give as many, 1 or more")
    return x, y


def _length(dataset: Any, name: str) -> int:
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError(
            f"{name}'s dataset has no len(): sparsify counts the training examples (N of the "
            "KL term) from it; use a map-style Dataset"
        ) from None
    if n == 0:
        raise ValueError(f"{name} holds no example")
    return n


def _check_folder(folder: Path, settings: dict[str, Any]) -> bool:
    """Whether ``folder`` is new (its settings are to be written), False for the
    folder of this same call. Refuses a folder of another call, a file, and a folder
    that holds files sparsify did not write (a pipeline's run folder has checkpoints of
    the same names: they would be read, then replaced)."""
    path = folder / SETTINGS
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"checkpoint_dir {str(folder)!r} is a file; give a folder")
    if folder.is_dir() and not path.exists() and any(folder.iterdir()):
        raise ValueError(
            f"checkpoint_dir {str(folder)!r} holds files sparsify did not write (no "
            "sparsify.json); give a new or empty folder"
        )
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != settings:
            diff = sorted(k for k in settings if recorded.get(k) != settings[k])
            raise ValueError(
                f"{folder} holds a sparsify run with other settings ({', '.join(diff)}); "
                "use another checkpoint_dir, or delete it to start afresh"
            )
        return False
    return True


def _record_settings(folder: Path, settings: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / SETTINGS) as f:
        f.write(json.dumps(settings, indent=1).encode())
