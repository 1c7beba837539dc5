"""The seed runner: the plans of a reproduction or sweep (a configuration and a folder
per method or scale), their runs over seeds with the finished stages they share run
once, one run after the other or several at once in worker processes (bbdrop.workers),
and the checks of the arguments every such command takes."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bbdrop import validate
from bbdrop.config import RunConfig, apply_overrides
from bbdrop.data import Dataset
from bbdrop.distributed import main_only
from bbdrop.files import check_writable
from bbdrop.pipeline import pipeline_stages, run_pipeline
from bbdrop.threads import available_cores
from bbdrop.train.loop import Progress

from .borrowing import _copy_checkpoint, _same_bb, _same_pretraining
from .catalogue import experiment_config, list_experiments
from .order import _rank


@dataclass(frozen=True)
class _Run:
    """One run of a reproduction: a configuration, its folder, the stages to run."""

    cfg: RunConfig
    folder: Path
    stages: tuple[str, ...] | None = None  # None: all

    @property
    def label(self) -> int:
        return self.cfg.seed


def _check_outputs_of(folder: Path, names: Sequence[str]) -> None:
    """ValueError, before any training, when a file a command writes at its end could not
    be written (a folder in its place, a file above it)."""
    for name in names:
        check_writable(folder / name)


def _check_seeds_and_jobs(seeds: Sequence[int], jobs: int) -> None:
    """ValueError unless ``seeds`` are distinct integers, at least one, and ``jobs`` >= 1;
    and not --jobs under torchrun."""
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "--jobs runs seeds in processes of its own and torchrun runs each seed in several: "
            "give one of the two (docs/distributed.md)"
        )
    if isinstance(seeds, (str, bytes)) or not all(map(validate.is_whole, seeds)):
        raise ValueError(f"seeds must be a list of integers, got {seeds!r}")
    if not seeds:
        raise ValueError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {', '.join(map(str, seeds))}; give each seed once")
    validate.whole("jobs", jobs, lo=1)


def _method_plans(
    name: str,
    base: RunConfig,
    overrides: Sequence[str],
    methods: Sequence[str] | None,
    out: Path,
) -> dict[str, tuple[RunConfig, Path]]:
    """Per run group, its configuration and the root of its seed folders."""
    if methods is None:
        return {base.gate.method: (base, out)}
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list of names, got {methods!r}")
    from bbdrop.gates import list_gates

    unknown = [m for m in methods if m not in list_gates()]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; available: {', '.join(list_gates())}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods repeat: {', '.join(methods)}; give each once")
    plans: dict[str, tuple[RunConfig, Path]] = {}
    for method in sorted({"bb" if m == "dbb" else m for m in methods}, key=_rank):
        tuned = f"{name}-{method}"
        if tuned in list_experiments():
            cfg = experiment_config(tuned, overrides)
        else:
            cfg = apply_overrides(base, [f"gate.method={method}"])
        dbb = cfg.epochs.dbb if method == "bb" and "dbb" in methods else 0
        cfg = apply_overrides(cfg, [f"epochs.dbb={dbb}", f"name={base.name}"])
        pipeline_stages(cfg)  # a table that cannot run fails now
        plans[method] = (cfg, out / method)
    return plans


def _run_plans(
    plans: dict[str, tuple[RunConfig, Path]],
    seeds: Sequence[int],
    data: Dataset,
    given: bool,
    progress: Callable[[int], Progress] | None,
    jobs: int,
    threads: int,
) -> dict[tuple[str, int], dict[str, Any]]:
    """The results of every plan (a configuration and the root of its seed folders) for
    every seed, keyed (plan, seed). With several plans the network is pretrained once
    per seed, in the first plan's folder, and its checkpoint copied to the others whose
    pretraining settings are the same; likewise the BB stage, for plans that differ
    only in the DBB stage (a sweep of DBB's weight)."""
    runs = {(key, seed): _Run(apply_overrides(cfg, [f"seed={seed}"]), root / f"seed-{seed}")
            for key, (cfg, root) in plans.items() for seed in seeds}  # fmt: skip
    sent = data if given or jobs == 1 else None  # workers load the data themselves
    cap = max(1, (threads or available_cores()) // min(jobs, len(runs)))
    first = next(iter(plans))
    for stage, same in (("pretrain", _same_pretraining), ("bb", _same_bb)):
        sharing = {(key, seed) for (key, seed), run in runs.items()
                   if key != first and same(runs[first, seed].cfg, run.cfg)}  # fmt: skip
        if not sharing:
            continue
        done = [dataclasses.replace(runs[first, s], stages=(stage,)) for s in seeds]
        _run_all(done, sent, progress, jobs, cap)

        def share(stage: str = stage, sharing: set[tuple[str, int]] = sharing) -> None:
            for (key, seed), run in runs.items():
                target = run.folder / f"{stage}.pt"
                if (key, seed) in sharing and not target.exists():
                    _copy_checkpoint(runs[first, seed].folder / f"{stage}.pt", target)

        main_only(share)  # under torchrun, process 0 copies
    results = _run_all(list(runs.values()), sent, progress, jobs, cap)
    return dict(zip(runs, results, strict=True))


def _run_all(
    runs: Sequence[_Run],
    data: Dataset | None,
    progress: Callable[[int], Progress] | None,
    jobs: int,
    cap: int,
) -> list[dict[str, Any]]:
    """Every run's results, in order: one after the other, or ``jobs`` at a time."""
    if jobs == 1:
        return [
            run_pipeline(r.cfg, r.folder, data, stages=r.stages, max_threads=cap,
                         progress=progress(r.label) if progress is not None else None)
            for r in runs
        ]  # fmt: skip
    return _run_in_processes(runs, data, progress, min(jobs, len(runs)), cap)


def _run_seed(job: tuple[_Run, Dataset | None, int], send: Callable[[Any], None]) -> dict[str, Any]:
    """One run, ``job = (run, data, max_threads)``, in a worker process of
    :func:`bbdrop.workers.run_all`; its progress goes back to the parent through ``send``."""
    run, data, max_threads = job

    def report(stage: str, record: Any, epochs: int) -> None:
        send((stage, record, epochs))

    return run_pipeline(
        run.cfg, run.folder, data, stages=run.stages, progress=report, max_threads=max_threads
    )


def _run_in_processes(
    runs: Sequence[_Run],
    data: Dataset | None,
    progress: Callable[[int], Progress] | None,
    jobs: int,
    max_threads: int,
) -> list[dict[str, Any]]:
    """The results of ``runs``, ``jobs`` at a time in spawned processes that end with
    this one (bbdrop.workers: Ctrl-C or SIGTERM stops them, a killed parent takes them
    along); a run that fails lets the others running finish and starts no other."""
    from bbdrop.workers import run_all

    callbacks = {r.label: progress(r.label) for r in runs} if progress is not None else {}

    def deliver(index: int, update: tuple[str, Any, int]) -> None:
        label = runs[index].label
        if label in callbacks:
            callbacks[label](*update)

    return run_all(_run_seed, [(r, data, max_threads) for r in runs], jobs, on_message=deliver,
                   labels=[r.label for r in runs], what="seeds")  # fmt: skip
