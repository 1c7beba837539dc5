"""Commands that fail leave the folder as it was: the start of a run undone when
torch.compile cannot build, figures written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bbdrop.config import RunConfig, apply_overrides
from bbdrop.data import Dataset
from bbdrop.pipeline import run_pipeline
from bbdrop.train.loop import CompileError

CFG = apply_overrides(RunConfig(), ["epochs.pretrain=1", "epochs.sparsify=1", "epochs.dbb=0",
                                    "device=cpu", "optim.batch_size=50"])  # fmt: skip


def synthetic() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(140, 1, 28, 28, generator=g), torch.randint(0, 10, (140,), generator=g)
    return Dataset.from_tensors(x[:100], y[:100], x[100:], y[100:], 10)


def builds_that_break(after: int):
    """A stand-in for torch.compile: the first ``after`` builds return the function
    itself, later ones a step that fails as a broken compiler would."""
    calls = []

    def compile_(fn, *args, **kwargs):
        calls.append(fn)
        if len(calls) <= after:
            return fn

        def step(*a, **k):
            raise OSError("cannot execute g++: broken installation")

        return step

    return compile_


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


@pytest.mark.slow
def test_without_a_compiler_compile_is_refused_and_the_advised_retry_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/g++",))
    out = tmp_path / "a" / "run"
    with pytest.raises(CompileError, match=r"needs a C\+\+ compiler .* run without --compile"):
        run_pipeline(apply_overrides(CFG, ["compile=true"]), out, synthetic())
    assert not (tmp_path / "a").exists()
    assert run_pipeline(CFG, out, synthetic())["stages"]["bb"]["error"] >= 0  # the retry


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True])
def test_a_compile_failure_on_the_first_step_undoes_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """Past the compiler check (another failure to build): the folder, config.toml and
    the lock file are as before, so the retry without compile is not refused."""

    monkeypatch.setattr("bbdrop.pipeline._check_compiler", lambda device: None)
    monkeypatch.setattr(torch, "compile", builds_that_break(after=0))
    out = tmp_path / "run"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = _listing(tmp_path)
    with pytest.raises(CompileError, match="could not build the training step"):
        run_pipeline(apply_overrides(CFG, ["compile=true"]), out, synthetic())
    assert _listing(tmp_path) == before
    monkeypatch.undo()
    assert "bb" in run_pipeline(CFG, out, synthetic())["stages"]


@pytest.mark.slow
def test_figures_are_written_whole_and_leave_no_temporary_file(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from bbdrop import plots

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    paths = plots.save_figure(fig, tmp_path / "sub" / "v1.2-front")  # a dot in the stem
    assert [p.name for p in paths] == ["v1.2-front.png", "v1.2-front.pdf"]
    assert paths[0].read_bytes().startswith(b"\x89PNG") and paths[1].read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(p.name for p in paths)


@pytest.mark.slow
def test_a_compile_failure_in_a_later_stage_keeps_the_run_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pretrain compiles and finishes, BB's build fails: config.toml stays, because the
    finished pretrain.pt was trained under it."""
    monkeypatch.setattr("bbdrop.pipeline._check_compiler", lambda device: None)
    monkeypatch.setattr(torch, "compile", builds_that_break(after=1))
    out = tmp_path / "run"
    with pytest.raises(CompileError):
        run_pipeline(apply_overrides(CFG, ["compile=true"]), out, synthetic())
    assert {"config.toml", "pretrain.pt"} <= {p.name for p in out.iterdir()}


def test_write_together_writes_all_or_none(tmp_path: Path) -> None:
    from bbdrop.files import write_together

    (tmp_path / "a").write_bytes(b"old")
    with pytest.raises(ValueError, match=r"cannot write /proc/bbdrop-x: .*choose another path"):
        write_together({tmp_path / "a": b"new", Path("/proc/bbdrop-x"): b"x"})
    assert (tmp_path / "a").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary file left
    write_together({tmp_path / "a": b"new", tmp_path / "sub" / "b": b"b"})
    assert (tmp_path / "a").read_bytes() == b"new" and (tmp_path / "sub" / "b").read_bytes() == b"b"
