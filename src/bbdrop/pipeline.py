"""The paper's pipeline as a table of stages: pretrain -> BB -> DBB (BB frozen) -> pre-prune.

A run is a sequence of :class:`Stage` entries (:func:`pipeline_stages`): dense
pretraining, the sparsification stage of the method named by ``gate.method``,
the DBB stage built on it, and pre-pruning, the DBB stage's after-step. Each
stage starts from the previous stage's final checkpoint in the run directory
and writes its own (``<stage>.pt``); an unfinished stage keeps an in-progress
checkpoint (``<stage>.last.pt``) that a new call resumes from. The resolved
configuration is written as ``config.toml`` and the figures of every finished
stage to ``results.json``.

This module computes and writes files; progress is reported through a
callback and printing is left to :mod:`bbdrop.cli`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bbdrop.attach import (
    active_units,
    attach_gates_,
    convert_gates_,
    gated_layers,
    prune_units_,
    side_effect_free,
    units_ever_active,
    units_kept,
)
from bbdrop.config import GateConfig, RunConfig, load_recorded_config, to_dict, to_toml
from bbdrop.data import Dataset, load_dataset
from bbdrop.files import write_atomic
from bbdrop.gates import get_gate_class
from bbdrop.metrics import measure, measured_flops, paper_figures
from bbdrop.threads import auto_threads, available_cores, num_threads
from bbdrop.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from bbdrop.train.loop import (
    CompileError,
    EpochRecord,
    Progress,
    evaluate,
    get_rng,
    set_rng,
    train_stage,
)

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
            before a checkpoint of the stage is loaded into a fresh network).
        train: whether the stage trains; one that does not runs ``after`` only.
        after: what is done to the model after training (or instead of it), before
            the stage's figures are taken: ``after(model, dataset)``.
    """

    name: str
    epochs: Callable[[RunConfig], int]
    setup: Callable[[nn.Module, RunConfig], None] | None = None
    train: bool = True
    after: Callable[[nn.Module, Dataset], None] | None = None


def _attach_method(model: nn.Module, cfg: RunConfig) -> None:
    """Attach the gates of ``gate.method`` with the [gate] settings that are set; a set
    setting that the method's constructor does not take is an error naming the ones
    it does take."""
    g = cfg.gate
    named = {
        "alpha": g.alpha,
        "temperature": g.temperature,
        "threshold": g.threshold,
        "kl_scale": g.kl_scale,
        "init_a": g.init_a,
        "init_b": g.init_b,
    }
    takes = [p for p in inspect.signature(get_gate_class(g.method)).parameters if p != "num_units"]
    kwargs: dict[str, Any] = {}
    for key, value in named.items():
        if key in takes:
            if value is not None:  # None: the method's own default
                kwargs[key] = value
        elif value is not None and value != getattr(GateConfig(), key):
            raise ValueError(
                f"gate.{key} = {value!r} does not apply to method {g.method!r}; remove it "
                f"(its settings: {', '.join(takes)})"
            )
    for key, value in g.settings.items():
        if key not in takes:
            raise ValueError(
                f"gate.settings.{key} does not apply to method {g.method!r}; its settings: "
                f"{', '.join(takes)}"
            )
        if key in kwargs:
            raise ValueError(f"gate.{key} and gate.settings.{key} are both set; keep one")
        kwargs[key] = value
    attach_gates_(model, g.method, conv_kl_scale=g.conv_kl_scale, **kwargs)
    layers = dict(gated_layers(model))
    for name, scale in g.layer_kl_scale.items():
        if name not in layers:
            raise ValueError(
                f"gate.layer_kl_scale.{name}: no gated layer of that name; the gated layers "
                f"of {cfg.model.name!r}: {', '.join(layers)}"
            )
        layers[name].gate.kl_scale = float(scale)


def _to_dbb(model: nn.Module, cfg: RunConfig) -> None:
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


def stage_model(cfg: RunConfig, stage: str, num_classes: int) -> nn.Module:
    """A freshly built network with the structure of ``stage`` (to load its checkpoint)."""
    from bbdrop.models import create_model

    table = pipeline_stages(cfg)
    names = [s.name for s in table]
    if stage not in names:
        raise ValueError(f"unknown stage {stage!r}; stages of {cfg.name!r}: {', '.join(names)}")
    model = create_model(cfg.model.name, num_classes=num_classes)
    for s in table[: names.index(stage) + 1]:
        if s.setup is not None:
            s.setup(model, cfg)
    return model


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
    accounting: dict[str, float]  # the paper's, by both counting and memory rules
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
    _check_out_dir(out)
    _check_recorded_config(cfg, out)
    _check_earlier_stages(out, names, wanted)
    device = resolve_device(cfg.device)
    if cfg.compile:
        _check_compiler(device)
    data = _stage_data(cfg, data)
    flops = _check_data_fits(stage_model(cfg, names[-1], data.num_classes), data, cfg)
    threads = cfg.threads or auto_threads(flops * cfg.optim.batch_size)
    threads = min(threads, max_threads or threads)
    made = [p for p in (out / ".lock", out, *out.parents) if not p.exists()]
    recorded = out / "config.toml"
    before = recorded.read_bytes() if recorded.is_file() else None
    listing = set(os.listdir(out)) if out.is_dir() else set()
    _make_dir(out)  # only once the run can start: no stray folders
    try:
        with _run_lock(out):
            return _run_stages(cfg, out, table, wanted, data, device, threads, progress,
                               on_start or (lambda: None))  # fmt: skip
    except CompileError:  # met on a stage's first step: undo the start if nothing else
        if set(os.listdir(out)) <= listing | {"config.toml", ".lock"}:  # was written
            _undo_start(out, made, recorded, before)
        raise


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


def _undo_start(out: Path, made: Sequence[Path], recorded: Path, before: bytes | None) -> None:
    """Put ``out`` back as it was before a run that wrote nothing but its start: the
    recorded configuration restored (or removed); the lock file and the folders this
    run made (``made``, innermost first) removed, folders only when empty."""
    if before is None:
        recorded.unlink(missing_ok=True)
    elif recorded.read_bytes() != before:
        write_atomic(recorded, before)
    for path in made:
        with contextlib.suppress(OSError):
            path.rmdir() if path != out / ".lock" else path.unlink()


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
) -> dict[str, Any]:
    """The stages of ``table`` in ``out``, which :func:`run_pipeline` has checked;
    ``on_start()`` once the checkpoints of finished stages have loaded, before the
    first stage trains."""
    names = [s.name for s in table]
    results: dict[str, Any] = {"stages": {}}  # rebuilt from the final checkpoints
    recorded = out / "config.toml"
    if not recorded.exists() or recorded.read_text(encoding="utf-8") != to_toml(cfg):
        _write_atomically(recorded, to_toml(cfg))
    data = data.to(device)
    with num_threads(threads):
        torch.manual_seed(cfg.seed)
        model = stage_model(cfg, names[0], data.num_classes).to(device)
        generator = torch.Generator().manual_seed(cfg.seed)
        batches = data.train_batches(cfg.optim.batch_size, generator)
        for i, stage in enumerate(table):
            if stage.setup is not None and i > 0:
                stage.setup(model, cfg)
            final = out / f"{stage.name}.pt"
            if final.exists():
                state = load_checkpoint(final, map_location=device)
                load_model_state(model, state, final)
                results["stages"][stage.name] = _stage_result(state, final)
                # a run killed between writing the final checkpoint and removing the
                # in-progress one left the latter behind: it is of no use now
                (out / f"{stage.name}.last.pt").unlink(missing_ok=True)
                if "rng" in state:  # the next stage draws as if this one had just run
                    set_rng(state["rng"], generator)
                continue
            if stage.name not in wanted:
                break  # and no later stage is wanted: _check_earlier_stages
            on_start, started = (lambda: None), on_start  # the first stage run calls it
            epochs = stage.epochs(cfg)
            result = _run_stage(model, stage, cfg, epochs, data, batches, out, generator, progress,
                                started)  # fmt: skip
            save_checkpoint(
                {
                    "stage": stage.name,
                    "model": model.state_dict(),
                    "result": result,
                    "rng": get_rng(generator),
                },
                final,
            )
            (out / f"{stage.name}.last.pt").unlink(missing_ok=True)
            results["stages"][stage.name] = result
            _write_json(out / "results.json", results)
    on_start()  # every stage had finished: the header comes before the table
    results["config"] = to_dict(cfg)
    _write_json(out / "results.json", results)
    return results


@contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the ``with`` block: a second process in the same folder is
    refused instead of racing the first for its checkpoints. The lock is the OS's
    (``flock``), released when the process ends however it ends; where there is no
    ``fcntl`` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        f = open(out / ".lock", "a+")  # closed by the with block below
    except OSError as err:
        raise ValueError(f"cannot open the lock file {out / '.lock'} ({err.strerror}); remove "
                         "it if it is not a file, or use another output folder") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another bbdrop process is running in {out}; wait for it to finish, or use "
                "another output folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_earlier_stages(out: Path, names: Sequence[str], wanted: Sequence[str]) -> None:
    """ValueError when a wanted stage starts from a stage that is neither wanted nor
    finished in ``out``."""
    for i, name in enumerate(names):
        later = [s for s in wanted if names.index(s) > i]
        if name not in wanted and later and not (out / f"{name}.pt").exists():
            raise ValueError(
                f"stage {later[0]!r} starts from the {name!r} checkpoint, and {out} has "
                f"none; run that stage first (bbdrop train --stage {name})"
            )


def load_data(cfg: RunConfig) -> Dataset:
    """The data set ``cfg.data`` names, found, verified and read as it says."""
    d = cfg.data
    return load_dataset(d.name, data_dir=d.data_dir, download=d.download, verify=d.verify)


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


def _check_data_fits(model: nn.Module, data: Dataset, cfg: RunConfig) -> int:
    """ValueError unless ``model`` maps the data's inputs to one score per class;
    the FLOPs of its forward pass on one example."""
    example = data.test_x[:1].cpu()
    what = f"model {cfg.model.name!r} and dataset {data.name!r} (inputs {tuple(example.shape[1:])})"
    try:
        with side_effect_free(model), torch.no_grad():
            scores = model(example)
        flops = measured_flops(model, example)
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_out_dir(out: Path) -> None:
    """ValueError unless ``out`` is a writable folder or can be made one."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        what = "is a file" if existing == out else f"is under {existing}, a file"
        raise ValueError(f"output {out} {what}, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output {out}: cannot write in {existing}; choose another --out")


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the output folder {out}: {err.strerror}; choose another --out"
        ) from None


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
) -> dict[str, Any]:
    """Train (or only finish) one stage; its figures as a dict. ``on_start()`` once its
    in-progress checkpoint, if any, has been read."""
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
            optim=cfg.optim,
            evaluate_on=(data.test_x, data.test_y),
            checkpoint=out / f"{stage.name}.last.pt",
            generator=generator,
            progress=progress,
            compile=cfg.compile,
            on_start=on_start,
        )
    if stage.after is not None:
        stage.after(model, data)
        error = evaluate(model, data.test_x, data.test_y)
        history.append(
            EpochRecord(
                len(history),
                0.0,
                0.0,
                0.0,
                error,
                units_kept(model),
                active_units(model),
                time.perf_counter() - t0,
            )
        )
    last = history[-1]
    example = data.test_x[:1]
    measured = measure(model, example)
    chance = chance_error(data.test_y, data.num_classes)
    return StageResult(
        stage=stage.name,
        error=last.error,
        chance_error=chance,
        at_chance=last.error >= chance - 3 * _binomial_se(chance, data.test_y.shape[0]),
        units=units_kept(model),
        active=last.active,
        epochs=epochs if stage.train else 0,
        seconds_per_epoch=statistics.median(r.seconds for r in history) if stage.train else 0.0,
        accounting=paper_figures(model, example, active=last.active or None),
        parameters=measured.parameters,
        executed_flops=measured.flops,
        compact=compact_figures(model, data),
        torch=str(torch.__version__),
        compile=cfg.compile,
        device=str(data.test_x.device),
        threads=torch.get_num_threads(),
        history=[r.to_dict() for r in history],
    ).to_dict()


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

    from bbdrop.compaction import CompactWarning, compact, inference_parameters, without_gates
    from bbdrop.metrics import latencies

    if not list(gated_layers(model)):
        return None
    example = data.train_x[:COMPACT_EXAMPLES]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompactWarning)  # the difference is recorded
            small = compact(model, example)
    except ValueError as err:  # no unit left in a layer, a layer compact() cannot cut
        return {"error": _first_line(err)}
    except Exception as err:  # a measurement must not cost the trained stage
        return {
            "error": f"{type(err).__name__}: {_first_line(err)} (a bbdrop bug: please report it)"
        }
    with side_effect_free(model):
        difference = float((small(example) - model(example)).abs().max())
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


def chance_error(labels: torch.Tensor, num_classes: int) -> float:
    """Error in percent of always answering the most frequent label of ``labels``."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    return 100.0 * (1.0 - float(counts.max()) / max(1, labels.numel()))


def _binomial_se(error: float, n: int) -> float:
    """Standard error in percentage points of an error rate measured on n examples."""
    p = error / 100.0
    return 100.0 * (p * (1.0 - p) / max(1, n)) ** 0.5


def _check_recorded_config(cfg: RunConfig, out: Path) -> None:
    """ValueError if ``out`` holds a run of another configuration."""
    path = out / "config.toml"
    if path.exists():
        recorded = load_recorded_config(path)
        # the device, the data location and the threads may differ between machines
        where = dataclasses.replace(
            recorded.data,
            data_dir=cfg.data.data_dir,
            download=cfg.data.download,
            verify=cfg.data.verify,
        )
        recorded = dataclasses.replace(recorded, device=cfg.device, threads=cfg.threads, data=where)
        if recorded != cfg:
            keys = _differences(to_dict(recorded), to_dict(cfg))
            raise ValueError(
                f"{out} holds a run with another configuration ({path}: "
                f"{', '.join(keys)} differ); use another output directory, or remove that "
                "one to start afresh"
            )


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configuration dicts."""
    out = []
    for key in dict.fromkeys([*a, *b]):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}")
    return out


def _write_atomically(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


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


def _write_json(path: Path, obj: Any) -> None:
    _write_atomically(path, json.dumps(obj, indent=2) + "\n")
