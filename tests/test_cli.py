"""The command line and the demo it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import bbdrop
from bbdrop.cli import main
from bbdrop.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_prints_a_row_per_stage(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "demo",
            "--dense-epochs",
            "2",
            "--bb-epochs",
            "2",
            "--dbb-epochs",
            "1",
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    # the figures themselves are checked on run_demo's return values (below); here,
    # that the command prints one row per stage under its header
    assert "units per gated layer (1-3-5)" in out
    assert [line.split()[0] for line in out.splitlines()[3:6]] == ["dense", "bb", "dbb"]
    assert " 64-128-64 " in out and " active " in out


def test_bad_setting_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--bb-epochs", "0", "--quiet"])
    assert exit_.value.code == 2
    assert "argument --bb-epochs: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["--version"]])
def test_help_and_version_are_printed(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    assert "bbdrop" in capsys.readouterr().out


@pytest.mark.slow
def test_the_installed_console_script_runs() -> None:
    """``pip install`` puts the ``bbdrop`` script of [project.scripts] next to the
    interpreter or on PATH; one process of it, the cheapest (``--version``)."""
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    script = shutil.which("bbdrop", path=search)
    if script is None:
        pytest.skip("no bbdrop console script next to the interpreter or on PATH: "
                    "pip install -e . installs it")  # fmt: skip
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["bbdrop", bbdrop.__version__]


def test_compile_option_reaches_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def record(cfg, out, **kwargs):
        seen.append(cfg.compile)
        return {"stages": {}}

    monkeypatch.setattr("bbdrop.pipeline.run_pipeline", record)
    assert main(["run", "lenet-500-300-fashion-cpu", "--quiet", "--out", "/nonexistent"]) == 0
    assert main(["run", "lenet-500-300-fashion-cpu", "--compile", "--out", "/nonexistent"]) == 0
    assert seen == [False, True]


def test_a_compile_failure_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from bbdrop import cli
    from bbdrop.train.loop import CompileError

    def demo_runs(handler) -> None:  # the demo command's handler replaced in the table
        commands = [dataclasses.replace(c, run=handler) if c.name == "demo" else c
                    for c in cli.COMMANDS]  # fmt: skip
        monkeypatch.setattr(cli, "COMMANDS", tuple(commands))

    def fail(args):
        raise CompileError("torch.compile could not build the training step (...)")

    demo_runs(fail)
    assert main(["demo", "--quiet"]) == 2
    assert "could not build" in capsys.readouterr().err

    def bug(args):
        raise RuntimeError("shape mismatch")

    demo_runs(bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not swallowed
        main(["demo", "--quiet"])


def test_cuda_request_without_cuda_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["demo", "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA device; use cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_sparsifies_at_close_to_dense_error() -> None:
    """The README's main job with its defaults. The README shows one reference output
    and states these bands, which leave room for the arithmetic of other CPUs, thread
    counts and torch versions: keep the two in step."""
    dense, bb, dbb = run_demo(DemoConfig(seed=0))
    assert dense.error < 5.0
    assert bb.error < dense.error + 3.0 and dbb.error < dense.error + 3.0
    assert sum(bb.kept.values()) < sum(dense.kept.values())  # BB pruned something
    assert all(dbb.units[k] < bb.kept[k] for k in bb.kept)  # DBB runs on fewer units
    assert dbb.kept == bb.kept  # with BB frozen, its keep mask is unchanged


@pytest.mark.parametrize(
    ("argv", "seeds", "overrides"),
    [
        (["--seeds", "1", "2", "3"], [1, 2, 3], []),  # spaced
        (["--seeds", "1,2,3"], [1, 2, 3], []),
        (["--seeds", "4,5", "6"], [4, 5, 6], []),
        (["--seeds", "1", "2", "epochs.sparsify=1"], [1, 2], ["epochs.sparsify=1"]),
        (["epochs.sparsify=1", "--seeds", "7"], [7], ["epochs.sparsify=1"]),
        ([], [1, 2, 3, 4, 5], []),
    ],
)
def test_reproduce_takes_seeds_spaced_or_comma_separated(
    argv: list[str], seeds: list[int], overrides: list[str]
) -> None:
    from bbdrop.cli import build_parser

    args = build_parser().parse_args(["reproduce", "lenet5-caffe-fashion-cpu", *argv])
    assert (args.seeds, args.overrides) == (seeds, overrides)


@pytest.mark.parametrize("bad", [["--seeds", "one"], ["--seeds", ","]])
def test_bad_seeds_name_the_option(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["reproduce", "lenet5-caffe-fashion-cpu", *bad])
    assert "argument --seeds:" in capsys.readouterr().err


@pytest.mark.parametrize(("rank", "lines"), [("0", 1), ("1", 0)])
def test_under_torchrun_process_0_alone_reports_a_bad_setting(
    rank: str, lines: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every process of a torchrun meets the same bad setting; process 0 says it once."""
    monkeypatch.setenv("RANK", rank)
    assert main(["run", "lenet-500-300-fashion-cpu", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == lines, err
    assert lines == 0 or err.startswith("bbdrop: error: OptimConfig.lr must be > 0")
