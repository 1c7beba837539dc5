"""The figures of a finished stage: the result record its checkpoint and ``results.json`` hold.

:func:`stage_record` measures a trained network: its error and the chance level
it must beat (:func:`chance_error`), its units, the paper's accounting, the
parameters and FLOPs it executes, and the network compacted and timed
(:func:`compact_figures`). :func:`compacted` is the compaction both it and
``bbdrop compact`` (:func:`bbdrop.experiments.compact_run`) start from.
:func:`_stage_result` checks that a final checkpoint's record is complete.

This module measures and builds records; it writes no files.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from bbdrop.attach import gated_layers, side_effect_free, units_kept
from bbdrop.data import Dataset
from bbdrop.metrics import measure, measured_flops, paper_figures
from bbdrop.train.checkpoint import CheckpointError
from bbdrop.train.loop import EpochRecord

__all__ = [
    "COMPACT_EXAMPLES",
    "LATENCY_BATCH",
    "LATER_KEYS",
    "RESULT_KEYS",
    "Compacted",
    "StageResult",
    "chance_error",
    "compact_figures",
    "compacted",
    "stage_record",
    "traced_figures",
    "without_compaction",
]


# -- running them -----------------------------------------------------------------------
@dataclass
class StageResult:
    """The figures of one finished stage."""

    stage: str
    error: float
    # The error of always answering the evaluation set's most frequent class, and
    # whether ``error`` is not clearly below it (within 3 binomial standard errors):
    # such a network learned nothing, whatever its speedup.
    chance_error: float
    at_chance: bool
    units: dict[str, int]
    active: dict[str, float]
    epochs: int
    seconds_per_epoch: float
    # the paper's, by both counting and memory rules (or traced_figures: no authors' count)
    accounting: dict[str, float | None]
    parameters: int  # measured: parameter values stored (gates included)
    executed_flops: int  # measured: matmul/conv FLOPs of one example's forward pass
    # The stage's network compacted (bbdrop.compact) and measured: None for a stage
    # without gates; {"error": ...} where it cannot be compacted (no unit kept).
    compact: dict[str, Any] | None
    torch: str  # what the random stream and the timings depend on: torch's version,
    compile: bool  # whether the step was compiled, the device and the thread count
    device: str
    threads: int
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out.update(out.pop("accounting"))  # speedup, speedup_authors, memory, ...
        return out


# What every stage's result holds (the accounting keys come from paper_figures).
RESULT_KEYS = frozenset(f.name for f in dataclasses.fields(StageResult)) - {"accounting"} | {
    "speedup",
    "speedup_authors",
    "memory",
    "memory_authors",
    "memory_params",
    "memory_params_authors",
}
# Figures added after checkpoints were first written: a stage finished before them
# has none, and stays finished (its table cell shows "-").
LATER_KEYS = frozenset({"compact"})


def _stage_result(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The figures a final checkpoint holds; CheckpointError unless they are complete."""
    result = state.get("result")
    missing = RESULT_KEYS - LATER_KEYS - set(result) if isinstance(result, dict) else RESULT_KEYS
    if missing:
        raise CheckpointError(
            f"{path} is not a finished stage's checkpoint (its result lacks "
            f"{', '.join(sorted(missing)[:3])}); delete it to run its stage again"
        )
    return result


def stage_record(
    model: nn.Module,
    stage: str,
    epochs: int,
    trained: bool,
    compiled: bool,
    data: Dataset,
    history: list[EpochRecord],
    paper: bool = True,
) -> dict[str, Any]:
    """The figures of ``model`` at the end of ``stage`` as a dict: ``epochs`` counted and
    the epochs timed only where the stage ``trained``; ``compiled``: whether its step
    was compiled. ``paper``: the paper's accounting (``bbdrop.metrics.paper_figures``,
    for sequential networks with the paper's placement); otherwise the traced one
    (:func:`traced_figures`), which has no authors' count."""
    last = history[-1]
    example = data.test_x[:1]
    if paper:
        accounting = paper_figures(model, example, active=last.active or None)
    else:
        accounting = traced_figures(model, data)
    measured = measure(model, example)
    chance = chance_error(data.test_y, data.num_classes)
    return StageResult(
        stage=stage,
        error=last.error,
        chance_error=chance,
        at_chance=last.error >= chance - 3 * _binomial_se(chance, data.test_y.shape[0]),
        units=units_kept(model),
        active=last.active,
        epochs=epochs if trained else 0,
        seconds_per_epoch=statistics.median(r.seconds for r in history) if trained else 0.0,
        accounting=accounting,
        parameters=measured.parameters,
        executed_flops=measured.flops,
        compact=compact_figures(model, data) if _MEASURE_COMPACT.get() else None,
        torch=str(torch.__version__),
        compile=compiled,
        device=str(data.test_x.device),
        threads=torch.get_num_threads(),
        history=[r.to_dict() for r in history],
    ).to_dict()


# Test inputs over which traced_figures averages DBB's active units.
TRACED_EXAMPLES = 1000


def traced_figures(model: nn.Module, data: Dataset) -> dict[str, float | None]:
    """The keys of ``bbdrop.metrics.paper_figures`` for a network the paper's accounting
    does not cover (a residual network, gates on coupled groups): FLOPs and parameters
    counted on the compacted network's graph (:func:`bbdrop.network_costs`; DBB: with
    its skipping, averaged over test inputs as the paper's count is). The authors'
    count rule and the im2col memory exist for the paper's sequential networks only:
    None ("-" in the tables)."""
    from bbdrop.metrics import network_costs

    x = data.test_x
    if any(True for _ in gated_layers(model)):
        costs = network_costs(model, x[:8], x[:TRACED_EXAMPLES])
        speedup, params = costs.expected_speedup, costs.parameters / costs.dense_parameters
        flops, dense = costs.expected_flops, costs.dense_flops
    else:  # the dense network is its own compacted one
        speedup, params = 1.0, 1.0
        flops = dense = measured_flops(model, x[:1])
    return {"speedup": speedup, "speedup_authors": None, "memory": None, "memory_authors": None,
            "memory_params": params, "memory_params_authors": None, "flops": flops,
            "flops_dense": dense}  # fmt: skip


# Whether stage records measure the compacted network (compact_figures); see without_compaction.
_MEASURE_COMPACT: contextvars.ContextVar[bool] = contextvars.ContextVar("measure", default=True)


@contextlib.contextmanager
def without_compaction() -> Iterator[None]:
    """Within the block, the stages of :func:`bbdrop.pipeline.run_pipeline` record
    ``compact`` as None instead of compacting and timing their network
    (:func:`compact_figures`): for runs that only check that a configuration trains
    (the tests' smoke runs), where that measurement is most of a stage's time."""
    token = _MEASURE_COMPACT.set(False)
    try:
        yield
    finally:
        _MEASURE_COMPACT.reset(token)


# Training inputs that compact() traces and checks on; test inputs a latency batch has.
COMPACT_EXAMPLES = 256
LATENCY_BATCH = 256


def compact_figures(model: nn.Module, data: Dataset) -> dict[str, Any] | None:
    """``model`` compacted (:func:`bbdrop.compact`) and measured against the dense network
    it was made from (its gated layers as plain layers): the parameter values it
    computes with, its ``FlopCounterMode`` FLOPs per example, its largest output
    difference to ``model`` on training inputs, and the latency of both at a batch
    of test inputs with the current thread count (interleaved rounds, one ratio
    within one measurement). None for a network without gates."""
    import warnings

    from bbdrop.compaction import CompactWarning, inference_parameters, without_gates
    from bbdrop.metrics import latencies

    if not list(gated_layers(model)):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompactWarning)  # the difference is recorded
            small, _, difference = compacted(model, data)
    except ValueError as err:  # no unit left in a layer, a layer compact() cannot cut
        return {"error": _first_line(err)}
    except Exception as err:  # a measurement must not cost the trained stage
        return {
            "error": f"{type(err).__name__}: {_first_line(err)} (a bbdrop bug: please report it)"
        }
    batch = data.test_x[:LATENCY_BATCH]
    times = latencies({"dense": without_gates(model), "compact": small}, batch, rounds=5)
    return {
        "parameters": inference_parameters(small),
        "flops": measured_flops(small, data.test_x[:1]),
        "max_difference": difference,
        "batch": len(batch),
        "latency_dense_ms": 1e3 * times["dense"],
        "latency_compact_ms": 1e3 * times["compact"],
        "speedup_measured": times["dense"] / times["compact"],
    }


class Compacted(NamedTuple):
    """What :func:`compacted` returns."""

    network: nn.Module  # the compacted network
    examples: torch.Tensor  # the training inputs it was traced and checked on
    max_difference: float  # its largest output difference to the gated network on them


def compacted(model: nn.Module, data: Dataset, *, round_to: int = 1) -> Compacted:
    """``model`` (with gates) compacted by :func:`bbdrop.compact` (widths rounded up to
    multiples of ``round_to``) on the first ``COMPACT_EXAMPLES`` training inputs of
    ``data``, and its largest output difference to ``model`` on them (``model`` run in
    evaluation mode, its modes and buffers left as they were). Raises what
    :func:`bbdrop.compact` raises, and emits its warnings."""
    from bbdrop.compaction import compact

    examples = data.train_x[:COMPACT_EXAMPLES].float()
    small = compact(model, examples, round_to=round_to)
    with side_effect_free(model):
        difference = float((small(examples) - model(examples)).abs().max())
    return Compacted(small, examples, difference)


def chance_error(labels: torch.Tensor, num_classes: int) -> float:
    """Error in percent of always answering the most frequent label of ``labels``."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    return 100.0 * (1.0 - float(counts.max()) / max(1, labels.numel()))


def _binomial_se(error: float, n: int) -> float:
    """Standard error in percentage points of an error rate measured on n examples."""
    p = error / 100.0
    return 100.0 * (p * (1.0 - p) / max(1, n)) ** 0.5


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
