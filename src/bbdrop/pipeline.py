"""Running the paper's pipeline: pretrain -> BB -> DBB (BB frozen) -> pre-prune.

:func:`run_pipeline` checks everything a run needs before it writes anything (the
configuration, the run folder, the data against the model's input, the recorded
files of an earlier run), then runs the stages of :func:`pipeline_stages` in
order. Each stage starts from the previous stage's final checkpoint in the run
directory and writes its own (``<stage>.pt``); an unfinished stage keeps an
in-progress checkpoint (``<stage>.last.pt``) that a new call resumes from. The
resolved configuration is written as ``config.toml`` and the figures of every
finished stage to ``results.json``.

The work is shared out: :mod:`bbdrop.stages` holds the stage table and the gates
a configuration gives each stage, :mod:`bbdrop.rundir` the run folder and its
files, :mod:`bbdrop.stage_figures` the measurement of a finished stage. This
module runs them, and stays the import path of the names it always offered.

It computes and writes files; progress is reported through a callback and
printing is left to :mod:`bbdrop.cli`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bbdrop.attach import active_units, gated_layers, side_effect_free, units_kept
from bbdrop.budget import (
    Budget,
    BudgetController,
    after_the_path,
    check_budget,
    cost_fractions,
    settle_,
    stage_goals,
)
from bbdrop.config import RunConfig, to_dict
from bbdrop.data import Dataset, list_datasets, load_dataset
from bbdrop.distributed import World, init_from_env, main_first, main_only
from bbdrop.factories import EXAMPLE, is_factory, load_factory_data
from bbdrop.metrics import measured_flops
from bbdrop.precision import check_precision
from bbdrop.rundir import (
    _check_earlier_stages,
    _check_out_dir,
    _check_recorded_config,
    _load_finished_stage,
    _make_dir,
    _note_start,
    _record_config,
    _run_lock,
    _save_finished_stage,
    _undo_start_if_untouched,
    _write_json,
)
from bbdrop.stage_figures import COMPACT_EXAMPLES as COMPACT_EXAMPLES
from bbdrop.stage_figures import LATENCY_BATCH as LATENCY_BATCH
from bbdrop.stage_figures import LATER_KEYS as LATER_KEYS
from bbdrop.stage_figures import RESULT_KEYS as RESULT_KEYS
from bbdrop.stage_figures import StageResult as StageResult
from bbdrop.stage_figures import _first_line, chance_error, stage_record
from bbdrop.stage_figures import compact_figures as compact_figures
from bbdrop.stages import STAGES, Stage, pipeline_stages, placement, resolve_device, stage_model
from bbdrop.threads import auto_threads, available_cores, num_threads
from bbdrop.train.loop import CompileError, EpochRecord, Progress, evaluate, train_stage

# Those imported "as" themselves lived here before the stages, the run folder and the
# figures moved out; re-exported, so that this module stays their import path.
__all__ = [
    "STAGES",
    "Stage",
    "chance_error",
    "load_data",
    "pipeline_stages",
    "resolve_device",
    "run_pipeline",
    "stage_model",
]


def run_pipeline(
    cfg: RunConfig,
    out_dir: str | Path,
    data: Dataset | None = None,
    *,
    stages: Sequence[str] | None = None,
    progress: Progress | None = None,
    max_threads: int | None = None,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``stages`` (default: all) of the pipeline in ``out_dir``.

    Everything is checked before anything is written: the configuration, the
    run directory, the data against the model's input, the recorded files of an
    earlier run. A run that cannot start leaves no folder behind.

    Args:
        data: the data set; loaded from ``cfg.data`` when None.
        stages: the stages to run; a stage that is not run must have its final
            checkpoint in ``out_dir`` already if a later one runs.
        max_threads: at most this many threads (runs side by side share the cores);
            None: ``cfg.threads``, or :func:`bbdrop.threads.auto_threads`'s choice.
        on_start: called once every check has passed, the checkpoints of finished
            stages included, before the first stage trains (the command line prints
            its header there).

    Returns:
        The results, as written to ``out_dir/results.json``.

    Raises:
        ValueError: a setting, the data or the run directory cannot be used.
        CheckpointError: a checkpoint in ``out_dir`` is unreadable or of another
            network; the message names the file to delete.
        DivergenceError: a stage's loss or weights stopped being finite; the
            checkpoint of its last good epoch is kept.
    """
    out, table, wanted = _checked_call(cfg, out_dir, stages)
    names = [s.name for s in table]
    _check_out_dir(out)
    _check_recorded_config(cfg, out)
    _check_earlier_stages(out, names, wanted)
    device = resolve_device(cfg.device)
    if cfg.compile:
        _check_compiler(device)
    check_precision(cfg.precision, device)
    ranks = init_from_env(device)  # under torchrun (docs/distributed.md); else one process
    data = _stage_data(cfg, data)  # process 0 loads (and downloads) first: load_data
    threads = _thread_count(cfg, names, data, max_threads)
    _check_budget(cfg, table, data)
    ranks.barrier()  # every rank has checked the folder before rank 0 writes in it
    if not ranks.main:  # the others read and compute; rank 0 alone writes
        return _run_stages(cfg, out, table, wanted, data, device, threads, None,
                           lambda: None, ranks)  # fmt: skip
    start = _note_start(out)
    _make_dir(out)  # only once the run can start: no stray folders
    try:
        with _run_lock(out):
            return _run_stages(cfg, out, table, wanted, data, device, threads, progress,
                               on_start or (lambda: None), ranks)  # fmt: skip
    except CompileError:  # met on a stage's first step
        _undo_start_if_untouched(out, start)  # if nothing else was written
        raise


def _checked_call(
    cfg: RunConfig, out_dir: str | Path, stages: Sequence[str] | None
) -> tuple[Path, tuple[Stage, ...], list[str]]:
    """The run folder, the stage table and the stages wanted of a call of
    :func:`run_pipeline`; TypeError or ValueError for an argument it cannot take."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(
            f"cfg must be a bbdrop.config.RunConfig (e.g. load_config(path)), got "
            f"{type(cfg).__name__}"
        )
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f"out_dir must name a folder, got {out_dir!r}")
    out = Path(out_dir)
    table = pipeline_stages(cfg)
    names = [s.name for s in table]
    wanted = list(names if stages is None else stages)
    for name in wanted:
        if name not in names:
            raise ValueError(f"unknown stage {name!r}; stages of {cfg.name!r}: {', '.join(names)}")
    if cfg.threads > available_cores():
        raise ValueError(
            f"threads={cfg.threads} is more than the {available_cores()} cores this process "
            "may use; give at most that many, or 0 to choose"
        )
    return out, table, wanted


def _thread_count(
    cfg: RunConfig, names: Sequence[str], data: Dataset, max_threads: int | None
) -> int:
    """The threads a run trains with: ``cfg.threads``, or chosen for the FLOPs of a batch
    of the last stage's network (which must fit the data), at most ``max_threads``."""
    from bbdrop.factories import build_model

    # the plain network first: gates placed on groups trace it on the data's inputs
    _check_data_fits(build_model(cfg.model.name, data.num_classes), data, cfg, count=False)
    model = stage_model(cfg, names[-1], data.num_classes, data.train_x[:8])
    flops = _check_data_fits(model, data, cfg, count=not cfg.threads)
    threads = cfg.threads or auto_threads(flops * cfg.optim.batch_size)
    if not cfg.threads:  # torchrun's processes on one machine share its cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = min(threads, max(1, available_cores() // local))
    return min(threads, max_threads or threads)


# -- a FLOP budget (cfg.budget, bbdrop.budget) ---------------------------------------------
BUDGET_EXAMPLES = 1000  # training inputs over which DBB's active units are averaged


def _gated_stages(table: Sequence[Stage]) -> list[str]:
    """The stages that train gates, in order: the budget steers them."""
    return [s.name for s in table if s.train and s.name != "pretrain"]


def _budget(cfg: RunConfig) -> Budget | None:
    """The run's budget (``[budget]``), or None."""
    b = cfg.budget
    return None if b.flops is None and b.params is None else Budget(b.flops, b.params)


def _check_budget(cfg: RunConfig, table: Sequence[Stage], data: Dataset) -> None:
    """ValueError, before anything runs, for a budget the run cannot steer to: no stage
    trains gates, or the target is below one unit per gate."""
    budget = _budget(cfg)
    if budget is None:
        return
    gated = _gated_stages(table)
    if not gated:
        raise ValueError(
            "a budget (budget.flops, budget.params) steers the stages that train gates, and "
            "this run has none (epochs.sparsify = 0): set epochs.sparsify > 0, or drop it"
        )
    # one unit per gate costs the same in every gated stage: the first's static gates
    model = stage_model(cfg, gated[0], data.num_classes, data.train_x[:8])
    check_budget(model, budget, data.train_x[:8])


def _budget_controller(
    model: nn.Module, stage: str, cfg: RunConfig, table: Sequence[Stage], data: Dataset
) -> BudgetController | None:
    """The controller that steers ``stage`` toward its goal under ``cfg.budget`` (a BB
    stage before DBB ends a little above the budget: :func:`bbdrop.budget.stage_goals`),
    measured on training inputs only; None without a budget or for an ungated stage."""
    budget = _budget(cfg)
    goals = {} if budget is None else stage_goals(budget, _gated_stages(table))
    if stage not in goals:
        return None
    start, goal = goals[stage]
    x = data.train_x
    return BudgetController(model, goal, x[:8], x[:BUDGET_EXAMPLES], start=start)


def _settle(model: nn.Module, controller: BudgetController, last: bool) -> dict[str, Any]:
    """The budget's figures of a stage: its goal, the cost reached (after removing the
    units that still keep it above the budget, on the last gated stage:
    :func:`bbdrop.budget.settle_`) and how the strength was steered."""
    budget, example, data = controller.budget, controller.example, controller.data
    settled = settle_(model, budget, example, data, fill=True) if last else 0  # type: ignore[arg-type]
    flops, params = cost_fractions(model, example, data)  # one compaction for every figure
    record = {"goal": controller.target, "cost": budget.cost(flops, params), "settled": settled,  # type: ignore[union-attr]
              "steering": controller.trace}  # fmt: skip
    if budget.params is not None:  # type: ignore[union-attr]
        record["asked"] = {"flops": budget.flops, "params": budget.params}  # type: ignore[union-attr]
        record["flops"], record["params"] = flops, params
    return record


def _check_compiler(device: torch.device) -> None:
    """CompileError, before anything is written, when torch.compile has no C++ compiler
    to build CPU code with (asked of torch's own search; where that private function
    is missing, the first training step finds out, and the start is undone)."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # pragma: no cover - another torch layout
        return
    try:
        get_cpp_compiler()
    except Exception as err:
        if type(err).__name__ != "InvalidCxxCompiler":
            return  # not the answer we can interpret: let the first step decide
        raise CompileError(
            "torch.compile needs a C++ compiler to build the training step on the CPU and "
            "found none (it tries $CXX, then g++); install one (e.g. apt-get install g++) "
            "or run without --compile (compile = false)"
        ) from None


def _run_stages(
    cfg: RunConfig,
    out: Path,
    table: Sequence[Stage],
    wanted: Sequence[str],
    data: Dataset,
    device: torch.device,
    threads: int,
    progress: Progress | None,
    on_start: Callable[[], None],
    ranks: World,
) -> dict[str, Any]:
    """The stages of ``table`` in ``out``, which :func:`run_pipeline` has checked;
    ``on_start()`` once the checkpoints of finished stages have loaded, before the
    first stage trains. Under torchrun every rank runs them; rank 0 alone writes, and
    the others wait for its files at each stage's end."""
    names = [s.name for s in table]
    results: dict[str, Any] = {"stages": {}}  # rebuilt from the final checkpoints
    if ranks.main:
        _record_config(cfg, out)
    data = data.to(device)
    with num_threads(threads):
        torch.manual_seed(cfg.seed)
        example = data.train_x[:8]  # what the group placement traces
        model = stage_model(cfg, names[0], data.num_classes, example).to(device)
        generator = torch.Generator().manual_seed(cfg.seed)
        batches = data.train_batches(cfg.optim.batch_size, generator)
        for i, stage in enumerate(table):
            if stage.setup is not None and i > 0:
                stage.setup(model, cfg, example)
            if (out / f"{stage.name}.pt").exists():
                results["stages"][stage.name] = _load_finished_stage(
                    model, stage.name, out, device, generator, ranks.main
                )
                continue
            if stage.name not in wanted:
                break  # and no later stage is wanted: _check_earlier_stages
            on_start, started = (lambda: None), on_start  # the first stage run calls it
            epochs = stage.epochs(cfg)
            controller = _budget_controller(model, stage.name, cfg, table, data)
            last = stage.name == (_gated_stages(table) or [None])[-1]
            result = _run_stage(model, stage, cfg, epochs, data, batches, out, generator, progress,
                                started, controller, last)  # fmt: skip
            results["stages"][stage.name] = result
            main_only(functools.partial(_save_stage_and_results, model, stage.name, result,
                                        out, generator, results))  # fmt: skip
    on_start()  # every stage had finished: the header comes before the table
    results["config"] = to_dict(cfg)
    main_only(lambda: _write_json(out / "results.json", results))  # a reproduction reads it
    return results


def _save_stage_and_results(
    model: nn.Module, stage: str, result: dict[str, Any], out: Path,
    generator: torch.Generator, results: dict[str, Any],
) -> None:  # fmt: skip
    _save_finished_stage(model, stage, result, out, generator)
    _write_json(out / "results.json", results)


def _run_stage(
    model: nn.Module,
    stage: Stage,
    cfg: RunConfig,
    epochs: int,
    data: Dataset,
    batches: Any,
    out: Path,
    generator: torch.Generator,
    progress: Progress | None,
    on_start: Callable[[], None],
    controller: BudgetController | None = None,
    last_gated: bool = False,
) -> dict[str, Any]:
    """Train (or only finish) one stage; its figures as a dict. ``on_start()`` once its
    in-progress checkpoint, if any, has been read. ``controller``: the budget's, which
    steers the stage (on the last gated stage, the units still above the budget are
    then removed: the figures are those of the network after)."""
    t0 = time.perf_counter()
    history: list[EpochRecord] = []
    if not stage.train:
        on_start()
    if stage.train:
        history = train_stage(
            model,
            batches,
            stage=stage.name,
            epochs=epochs,
            num_train=data.train_x.shape[0],
            optim=cfg.optim if controller is None else after_the_path(cfg.optim),
            evaluate_on=(data.test_x, data.test_y),
            checkpoint=out / f"{stage.name}.last.pt",
            generator=generator,
            progress=progress,
            compile=cfg.compile,
            precision=cfg.precision,
            on_start=on_start,
            controller=controller,
        )
    budget = None if controller is None else _settle(model, controller, last_gated)
    grouped = placement(cfg) == "groups"
    if grouped and stage.train and any(True for _ in gated_layers(model)):
        _recalibrate(model, data, history)
    if stage.after is not None:
        stage.after(model, data)
        history.append(_after_record(model, data, len(history), t0))
    record = stage_record(model, stage.name, epochs, stage.train, cfg.compile, data, history,
                          paper=not grouped)  # fmt: skip
    if budget is not None:
        record["budget"] = budget
    return record


def _recalibrate(model: nn.Module, data: Dataset, history: list[EpochRecord]) -> None:
    """Re-estimate the batch norms' running statistics with the gates at their test-time
    values (:func:`bbdrop.recipe.recalibrate_batch_norms`, as ``sparsify`` does), and
    measure the last epoch's error again with them: a network whose gates trained on
    coupled groups (a residual network's) compounds the norms' lag layer after layer."""
    from bbdrop.recipe import RECALIBRATION_EXAMPLES, recalibrate_batch_norms

    recalibrate_batch_norms(model, data.train_x[:RECALIBRATION_EXAMPLES])
    if history:
        history[-1] = dataclasses.replace(history[-1], error=evaluate(model, data.test_x,
                                                                      data.test_y))  # fmt: skip


def _after_record(model: nn.Module, data: Dataset, epoch: int, t0: float) -> EpochRecord:
    """The history entry of a stage's after-step: the network's error and units once it
    is done, ``epoch`` following the trained ones, and the seconds since ``t0``."""
    error = evaluate(model, data.test_x, data.test_y)
    return EpochRecord(
        epoch,
        0.0,
        0.0,
        0.0,
        error,
        units_kept(model),
        active_units(model),
        time.perf_counter() - t0,
    )


# -- the data a run trains on -----------------------------------------------------------
def load_data(cfg: RunConfig) -> Dataset:
    """The data set ``cfg.data`` names, found, verified and read as it says; or, for a
    name ``module.path:attribute``, the data set that factory of the user's own returns
    (:func:`bbdrop.factories.load_factory_data`; ``data.data_dir`` is passed to it)."""
    d = cfg.data
    if is_factory(d.name):
        return main_first(lambda: load_factory_data(d.name, d.data_dir))
    if d.name not in list_datasets():
        raise ValueError(
            f"unknown dataset {d.name!r}; available: {', '.join(list_datasets())}, or a data "
            f"set of your own as module.path:attribute (e.g. {EXAMPLE['data']!r})"
        )
    # under torchrun, process 0 downloads and verifies first, the others then read
    return main_first(
        lambda: load_dataset(d.name, data_dir=d.data_dir, download=d.download, verify=d.verify)
    )


def _stage_data(cfg: RunConfig, data: Dataset | None) -> Dataset:
    """The data a run trains and evaluates on: loaded, held out, limited per ``cfg.data``."""
    if data is None:
        data = load_data(cfg)
    if cfg.data.validation:
        data = data.hold_out(cfg.data.validation)
    n = cfg.data.limit_train
    if n:
        if n > data.train_x.shape[0]:
            raise ValueError(
                f"data.limit_train={n} exceeds the {data.train_x.shape[0]} training examples "
                f"of {data.name!r}; use at most that many, or 0 for all"
            )
        data = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    return data


def _check_data_fits(model: nn.Module, data: Dataset, cfg: RunConfig, count: bool) -> int:
    """ValueError unless ``model`` maps the data's inputs to one score per class; the
    FLOPs of its forward pass on one example if ``count``, else 0 (the first count
    imports torch's compiler stack, a second and more at the start of a run that
    does not need it)."""
    example = data.test_x[:1].cpu()
    what = f"model {cfg.model.name!r} and dataset {data.name!r} (inputs {tuple(example.shape[1:])})"
    try:
        with side_effect_free(model), torch.no_grad():
            scores = model(example)
        flops = measured_flops(model, example) if count else 0
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"{what} do not fit: {_first_line(err)}; choose a model made for these inputs "
            "(bbdrop list shows the shipped pairs)"
        ) from None
    if tuple(scores.shape) != (1, data.num_classes):
        raise ValueError(
            f"{what} do not fit: the model gives {tuple(scores.shape)[1:]} scores per example, "
            f"the data have {data.num_classes} classes"
        )
    return flops
