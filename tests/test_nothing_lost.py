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


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


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


@pytest.mark.parametrize("existing", [False, True])
def test_a_compile_failure_on_the_first_step_undoes_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """Past the compiler check (another failure to build): the folder, config.toml and
    the lock file are as before, so the retry without compile is not refused."""

    def broken_build(fn, *args, **kwargs):
        def step(*a, **k):
            raise OSError("cannot execute g++: broken installation")

        return step

    monkeypatch.setattr("bbdrop.pipeline._check_compiler", lambda device: None)
    monkeypatch.setattr(torch, "compile", broken_build)
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


def test_figures_are_written_whole_and_leave_no_temporary_file(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from bbdrop import plots

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    paths = plots.save_figure(fig, tmp_path / "sub" / "v1.2-front")  # a dot in the stem
    assert [p.name for p in paths] == ["v1.2-front.png", "v1.2-front.pdf"]
    assert paths[0].read_bytes().startswith(b"\x89PNG") and paths[1].read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(p.name for p in paths)
