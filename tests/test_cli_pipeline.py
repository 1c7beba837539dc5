"""The ``bbdrop`` command end to end: run, train, reproduce, list and --help, on a tiny
Fashion-MNIST written in the real format (gzipped IDX files in ``<root>/fashion-mnist/``)
and read through the real loader with ``data.download=false``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import smallfiles

from bbdrop.cli import main
from bbdrop.config import load_config
from bbdrop.experiments import list_experiments, markdown_table, reproduce, summarize

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

N_TRAIN, N_TEST = 200, 50
STAGES = ("pretrain", "bb", "dbb", "preprune")  # the pipeline's stages, in order
SHIPPED = "lenet-500-300-fashion-cpu"  # a shipped experiment on Fashion-MNIST
TINY = ["epochs.pretrain=1", "epochs.sparsify=1", "epochs.dbb=1", "device=cpu",
        "optim.batch_size=50"]  # fmt: skip
WIDTHS = {"fc1": 784, "fc2": 500, "fc3": 300}  # inputs of LeNet-500-300's gated layers
ROWS = {"Original": "pretrain", "BB": "bb", "DBB": "dbb"}
FIGURES = ("training-curves", "mask-correlations", "example-masks", "input-masks")


@pytest.fixture(autouse=True)
def hermetic_data_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hermetic(tmp_path, monkeypatch)


def _hermetic(tmp: Path, mp: pytest.MonkeyPatch) -> None:
    """Only the folders a test names are searched: no $BBDROP_DATA, an empty user cache,
    and not the system folder (Debian's dataset-fashion-mnist installs the real files in
    /usr/share/datasets/fashion-mnist, which would hide a missing data set)."""
    mp.delenv("BBDROP_DATA", raising=False)
    mp.setenv("XDG_CACHE_HOME", str(tmp / "xdg-cache"))
    mp.setenv("BBDROP_SYSTEM_DATA", "")  # no system folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    smallfiles.write_idx_dataset(root, "fashion-mnist", N_TRAIN, N_TEST)
    return root


def data_args(root: Path) -> list[str]:
    return [f"data.data_dir={root}", "data.download=false", "data.verify=false"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A run configuration of these tests' own: one epoch per stage on the tiny data
    (read only; a test writes its runs elsewhere)."""
    path = tmp_path_factory.mktemp("config") / "tiny-fashion.toml"
    path.write_text(
        f"""name = "tiny-fashion"
seed = 1
device = "cpu"

[data]
name = "fashion-mnist"
data_dir = {json.dumps(str(data_root))}
download = false
verify = false

[model]
name = "lenet_500_300"

[optim]
batch_size = 50

[epochs]
pretrain = 1
sparsify = 1
dbb = 1
"""
    )
    return path


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory, config_file: Path) -> tuple[Path, str]:
    """``bbdrop reproduce CONFIG --seeds 1,2`` run once (one process, figures drawn), its
    experiment folder and what it printed: read, never changed, by the tests of
    reproduce, of --jobs (the sequential reference) and of compact (a finished run)."""
    out = tmp_path_factory.mktemp("reproduced")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        _hermetic(out, mp)
        rc = main(["reproduce", str(config_file), "--seeds", "1,2", "--out", str(out), "--quiet"])
    assert rc == 0
    return out / "tiny-fashion", stdout.getvalue()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def table_rows(text: str) -> list[str]:
    """The row labels of a Markdown table (Original, BB, DBB)."""
    labels = [line.strip().strip("|").split("|")[0].strip() for line in text.splitlines()]
    return [label for label in labels if label in ROWS]


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def expected_row(runs: Sequence[dict[str, Any]], stage: str) -> dict[str, Any]:
    """A row of the summary computed here from results.json: medians over the runs,
    DBB units as the average active units per test example."""
    figs = [r["stages"][stage] for r in runs]
    units_of = "active" if stage == "dbb" else "units"
    layers = list(figs[0][units_of])
    keys = ("error", "speedup", "speedup_authors", "memory_authors", "memory_params_authors",
            "seconds_per_epoch")  # fmt: skip
    return {
        "stage": stage,
        "seeds": len(runs),
        "units": {n: median([float(f[units_of][n]) for f in figs]) for n in layers},
        "active": stage == "dbb",
        "at_chance": sum(f["at_chance"] for f in figs),
        **{k: median([f[k] for f in figs]) for k in keys},
        # the dense network is its own compacted network; the others were timed
        "speedup_measured": 1.0
        if stage == "pretrain"
        else median([f["compact"]["speedup_measured"] for f in figs]),
    }


def check_summary(runs: Sequence[dict[str, Any]], rows: Sequence[str]) -> None:
    """summarize() returns, and markdown_table() prints, exactly these rows' medians."""
    summary = summarize(runs)
    assert list(summary) == list(rows)
    for row in rows:
        got, want = dict(summary[row]), expected_row(runs, ROWS[row])
        assert got.pop("units") == pytest.approx(want.pop("units")), row
        assert got == pytest.approx(want), row


def read_results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def mtimes(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")}


# -- run --------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_trains_every_stage_then_resumes_without_training(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["run", SHIPPED, *TINY, *data_args(data_root), "--out", str(out), "--quiet"]
    rc, stdout, err = cli(capsys, *argv)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "config.toml", "results.json", *(f"{s}.pt" for s in STAGES)]
    )
    cfg = load_config(out / "config.toml")
    assert cfg.name == SHIPPED and cfg.model.name == "lenet_500_300"
    assert (cfg.epochs.pretrain, cfg.epochs.sparsify, cfg.epochs.dbb) == (1, 1, 1)
    assert cfg.optim.batch_size == 50 and cfg.data.download is False

    results = read_results(out)
    assert list(results["stages"]) == list(STAGES)
    for stage in ("pretrain", "bb", "dbb"):
        fig = results["stages"][stage]
        assert len(fig["history"]) == 1 and fig["epochs"] == 1
        # the error is over the 50 test images written, so a multiple of 2 %
        assert fig["error"] * N_TEST / 100 == pytest.approx(round(fig["error"] * N_TEST / 100))
    assert set(results["stages"]["bb"]["units"]) == set(WIDTHS)
    assert all(0 < n <= WIDTHS[k] for k, n in results["stages"]["bb"]["units"].items())

    check_summary([results], ["Original", "BB", "DBB"])
    assert markdown_table([results]) in stdout
    assert summarize([results])["Original"]["units"] == {}
    assert str(out) in stdout

    before = mtimes(out)
    assert set(before) == {f"{s}.pt" for s in STAGES}
    rc, again, err = cli(capsys, *argv)
    assert rc == 0, err
    assert mtimes(out) == before  # no stage trained (or saved) again
    assert markdown_table([results]) in again
    assert read_results(out)["stages"] == results["stages"]


@pytest.mark.slow
def test_run_accepts_a_config_file(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "run", str(config_file), "epochs.dbb=0", "--out", str(out))
    assert rc == 0, err
    assert "bbdrop run tiny-fashion: lenet_500_300 on fashion-mnist, seed 1" in stdout
    results = read_results(out)
    assert list(results["stages"]) == ["pretrain", "bb"]  # DBB and its pre-pruning skipped
    assert table_rows(stdout) == ["Original", "BB"]
    assert load_config(out / "config.toml").epochs.dbb == 0


# -- compact ----------------------------------------------------------------------------
@pytest.mark.slow
def test_compact_writes_the_smaller_network_of_a_finished_run(
    tmp_path: Path,
    reproduced: tuple[Path, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    import bbdrop
    import bbdrop.compaction
    from bbdrop.pipeline import load_data, stage_model
    from bbdrop.train.checkpoint import load_checkpoint

    run = tmp_path / "run"  # a finished run of the config file: seed 1 of `reproduce`
    shutil.copytree(reproduced[0] / "seed-1", run)
    rc, stdout, err = cli(capsys, "compact", str(run))
    assert rc == 0, err
    assert stdout.startswith("stage preprune: units per gated layer")  # the last stage
    path = run / "preprune.compact.safetensors"
    dense = sum(
        p.numel() for p in bbdrop.create_model("lenet_500_300", num_classes=10).parameters()
    )
    assert f"wrote {path}" in stdout and f"parameters: {dense} -> " in stdout
    cfg = load_config(run / "config.toml")
    data = load_data(cfg)
    gated = stage_model(cfg, "preprune", 10)
    gated.load_state_dict(load_checkpoint(run / "preprune.pt")["model"])
    small = bbdrop.load_compact(path)
    with torch.no_grad():
        torch.testing.assert_close(small(data.test_x), gated.eval()(data.test_x), rtol=0,
                                   atol=1e-5)  # fmt: skip
    kept = bbdrop.units_kept(gated)
    for name in ("fc1", "fc2", "fc3"):
        assert f"  {name:<24} {kept[name]:>6} -> " in stdout
    calls = []  # this short run keeps every unit: the rounding itself is in test_compact
    compact = bbdrop.compaction.compact
    monkeypatch.setattr(bbdrop.compaction, "compact",
                        lambda *a, **k: calls.append(k) or compact(*a, **k))  # fmt: skip
    rc, stdout, err = cli(capsys, "compact", str(run), "--stage", "bb", "--out",
                          str(tmp_path / "bb.safetensors"), "--round-to", "8")  # fmt: skip
    assert rc == 0 and stdout.startswith("stage bb:"), err
    assert calls == [{"round_to": 8}]
    gated = stage_model(cfg, "bb", 10)
    gated.load_state_dict(load_checkpoint(run / "bb.pt")["model"])
    rounded = bbdrop.load_compact(tmp_path / "bb.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(rounded(data.test_x), gated.eval()(data.test_x), rtol=0,
                                   atol=1e-5)  # fmt: skip
    for argv, message in (
        (["--stage", "pretrain"], "stage 'pretrain' has no gates: nothing to compact"),
        (["--stage", "sbp"], "unknown stage 'sbp'; stages of 'tiny-fashion': pretrain, bb, dbb"),
        (["--round-to", "0"], "round_to must be a whole number of units, 1 or more, got 0"),
    ):
        rc, _, err = cli(capsys, "compact", str(run), *argv)
        assert rc == 2 and message in err, err
    rc, _, err = cli(capsys, "compact", str(tmp_path))
    assert rc == 2 and "is not a run directory (no config.toml)" in err


# -- train ------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_one_stage_at_a_time(
    tmp_path: Path,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = Path("runs") / "tiny-fashion" / "seed-1"  # the default run directory

    rc, _, err = cli(capsys, "train", str(config_file), "--stage", "bb", "--quiet")
    assert rc == 2
    assert "starts from the 'pretrain' checkpoint" in err
    assert "run that stage first (bbdrop train --stage pretrain)" in err
    assert str(run_dir) in err
    assert not list(run_dir.glob("*.pt"))

    rc, stdout, err = cli(capsys, "train", str(config_file), "--stage", "pretrain", "--quiet")
    assert rc == 0, err
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["pretrain.pt"]
    assert table_rows(stdout) == ["Original"]
    assert list(read_results(run_dir)["stages"]) == ["pretrain"]

    rc, _, err = cli(capsys, "train", str(config_file), "--stage", "dbb", "--quiet")
    assert rc == 2
    assert "starts from the 'bb' checkpoint" in err and "bbdrop train --stage bb" in err

    pretrained = mtimes(run_dir)
    rc, stdout, err = cli(capsys, "train", str(config_file), "--stage", "bb", "--quiet")
    assert rc == 0, err
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["bb.pt", "pretrain.pt"]
    assert mtimes(run_dir)["pretrain.pt"] == pretrained["pretrain.pt"]  # not trained again
    results = read_results(run_dir)
    assert list(results["stages"]) == ["pretrain", "bb"]
    assert table_rows(stdout) == ["Original", "BB"]
    check_summary([results], ["Original", "BB"])


# -- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.bogus=1", "unknown key 'optim.bogus'"),
        ("nosuch=1", "unknown key 'nosuch'"),
        ("epochs.bbb=2", "unknown key 'epochs.bbb'"),
        ("epochs.sparsify=many", "epochs.sparsify must be an integer"),
    ],
)
def test_a_bad_override_is_refused_naming_the_key(
    tmp_path: Path,
    data_root: Path,
    override: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    argv = ["run", SHIPPED, *data_args(data_root), override, "--out", str(out), "--quiet"]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2
    assert message in err and err.startswith("bbdrop: error:")
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("command", ["run", "train", "reproduce"])
def test_an_unknown_experiment_lists_the_shipped_ones(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "no-such-experiment", "--out", str(tmp_path / "out"), "--quiet"]
    if command == "train":
        argv += ["--stage", "pretrain"]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2
    assert "unknown experiment 'no-such-experiment'" in err
    shipped = err.split("shipped:", 1)[1]
    for name in list_experiments():
        assert name in shipped
    assert not (tmp_path / "out").exists()


def test_a_missing_dataset_names_the_folder_and_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["run", SHIPPED, *TINY, *data_args(empty), "--out", str(tmp_path / "run"), "--quiet"]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2
    assert (
        f"dataset 'fashion-mnist': no folder {empty / 'fashion-mnist'}, and download=False" in err
    )
    assert f"place these files in {empty / 'fashion-mnist'}" in err
    for name in smallfiles.IDX_FILES:
        assert name in err
    assert not (empty / "fashion-mnist").exists()  # nothing created without download
    assert not list((tmp_path / "run").glob("*.pt"))


def test_overrides_may_follow_the_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # optim.bogus makes the command stop at the configuration, before any training
    rc = main(["run", SHIPPED, "--out", str(tmp_path / "run"), "--quiet", "optim.bogus=1"])
    assert rc == 2
    assert "unknown key 'optim.bogus'" in capsys.readouterr().err
    rc = main(["reproduce", SHIPPED, "--seeds", "1,2", "--quiet", "optim.bogus=2"])
    assert rc == 2
    assert "unknown key 'optim.bogus'" in capsys.readouterr().err


# -- reproduce --------------------------------------------------------------------------
@pytest.mark.slow
def test_reproduce_writes_seeds_table_summary_and_figures(
    tmp_path: Path, reproduced: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out, stdout = reproduced

    runs = []
    for seed in (1, 2):
        run_dir = out / f"seed-{seed}"
        assert sorted(p.name for p in run_dir.glob("*.pt")) == sorted(f"{s}.pt" for s in STAGES)
        assert load_config(run_dir / "config.toml").seed == seed
        runs.append(read_results(run_dir))
        assert list(runs[-1]["stages"]) == list(STAGES)

    table = (out / "table.md").read_text()
    assert table.startswith("**tiny-fashion, seeds 1 2**")
    assert table == markdown_table(runs, "tiny-fashion, seeds 1 2")
    assert table in stdout
    check_summary(runs, ["Original", "BB", "DBB"])

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["Original", "BB", "DBB"]
    for row, stage in ROWS.items():
        a, b = (r["stages"][stage] for r in runs)
        assert summary[row]["stage"] == stage and summary[row]["seeds"] == 2
        for key in ("error", "speedup", "speedup_authors", "memory_params_authors",
                    "seconds_per_epoch"):  # fmt: skip
            assert summary[row][key] == pytest.approx((a[key] + b[key]) / 2), (row, key)
        units_of = "active" if stage == "dbb" else "units"
        assert summary[row]["units"] == pytest.approx(
            {n: (a[units_of][n] + b[units_of][n]) / 2 for n in a[units_of]}
        )

    for stem in FIGURES:  # input-masks: the first gated layer has the 784 inputs
        png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), png
        assert pdf.read_bytes().startswith(b"%PDF"), pdf
        assert f"figure: {png}" in stdout and f"figure: {pdf}" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["seed-1", "seed-2", "table.md", "summary.json"]
        + [f"{s}.{ext}" for s in FIGURES for ext in ("png", "pdf")]
    )

    # the results alone, as kept in docs/runs/: a copy without the checkpoints
    kept = tmp_path / "out" / "tiny-fashion"
    shutil.copytree(out, kept, ignore=shutil.ignore_patterns("*.pt"))
    assert list(kept.glob("seed-1/*.json")) and not list(kept.glob("seed-*/*.pt"))
    rc, stdout, err = cli(capsys, "table", str(kept))
    assert rc == 0, err
    assert stdout == markdown_table(runs, "tiny-fashion, 2 seed(s)") + "\n"


def test_a_table_of_methods_run_on_different_seeds_says_how_many_each_row_has() -> None:
    """A table built across calls (one method, one seed at a time) has every method of
    any seed, each row the median of the seeds that have it, and says so where a row has
    fewer seeds than the table's most."""

    def stage(error: float) -> dict[str, Any]:
        return {"error": error, "speedup": error / 2, "speedup_authors": error / 4,
                "memory_authors": 0.5, "memory_params_authors": 0.25,
                "seconds_per_epoch": 1.0, "units": {"fc1": int(error)}, "active": None,
                "at_chance": False}  # fmt: skip

    runs = [  # seed 1 lacks VIB, seeds 2 and 3 lack SSL; stages in the order of each run
        {"stages": {"pretrain": stage(10.0), "ssl": stage(12.0), "bb": stage(11.0)}},
        {"stages": {"pretrain": stage(20.0), "vib": stage(30.0), "bb": stage(21.0)}},
        {"stages": {"vib": stage(40.0), "pretrain": stage(30.0), "bb": stage(31.0)}},
    ]
    summary = summarize(runs)
    assert list(summary) == ["Original", "SSL", "VIB", "BB"]  # the paper's order
    assert {row: fig["seeds"] for row, fig in summary.items()} == {
        "Original": 3, "SSL": 1, "VIB": 2, "BB": 3}  # fmt: skip
    assert summary["VIB"]["error"] == 35.0 and summary["VIB"]["units"] == {"fc1": 35.0}
    assert summary["SSL"]["error"] == 12.0 and summary["BB"]["error"] == 21.0
    rows = [line.split(" | ")[:2] for line in markdown_table(runs).splitlines()[2:6]]
    assert rows == [["| Original", "20.00"], ["| SSL (1 of 3 seeds)", "12.00"],
                    ["| VIB (2 of 3 seeds)", "35.00"], ["| BB", "21.00"]]  # fmt: skip


@pytest.mark.slow
def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`bbdrop list | head -1`: once the reader has gone, no traceback and no error
    message, and the exit status of a process ended by SIGPIPE."""
    import subprocess

    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "bbdrop.cli", "list"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


# -- list and help ----------------------------------------------------------------------
def test_list_prints_every_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, _ = cli(capsys, "list")
    assert rc == 0
    folder = resources.files("bbdrop") / "configs"
    shipped = sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))
    assert len(shipped) >= 6 and list_experiments() == shipped
    lines = {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}
    assert sorted(lines) == shipped
    for name in shipped:
        raw = tomllib.loads((folder / f"{name}.toml").read_text())
        e = raw["epochs"]
        assert lines[name][1:3] == [raw["model"]["name"], raw["data"]["name"]]
        assert f"{e['pretrain']}/{e['sparsify']}/{e['dbb']}" in lines[name]


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["train"],
        ["reproduce"],
        ["sweep"],
        ["front"],
        ["table"],
        ["list"],
        ["demo"],
        ["compact"],
    ],
)
def test_help_of_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"usage: {' '.join(['bbdrop', *command])}")
    if command and command[0] not in ("list", "front", "table", "compact"):
        assert "--quiet" in stdout


@pytest.mark.slow
def test_reproduce_with_jobs_runs_seeds_in_parallel_to_the_same_results(
    tmp_path: Path,
    config_file: Path,
    reproduced: tuple[Path, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--jobs 2 runs the two seeds in two processes, one thread each (the tiny network
    gets one anyway), relays their progress to the command's callback of each seed, and
    gives the sequential run's results (the ``reproduced`` fixture: jobs 1)."""
    import bbdrop.experiments

    seen: list[tuple[int, str, int]] = []  # what reaches the parent's callback of each seed

    def spying(*args: Any, progress: Any, **kwargs: Any) -> Any:
        def per_seed(seed: int) -> Any:
            command_s = progress(seed)  # the command's own bars still get every epoch

            def relay(stage: str, record: Any, epochs: int) -> None:
                seen.append((seed, stage, record.epoch))
                command_s(stage, record, epochs)

            return relay

        return reproduce(*args, progress=per_seed, **kwargs)

    monkeypatch.setattr(bbdrop.experiments, "reproduce", spying)  # what the command calls
    argv = ["reproduce", str(config_file), "--seeds", "1,2", "--no-figures", "--jobs", "2"]
    rc, _, err = cli(capsys, *argv, "--out", str(tmp_path / "par"), "--quiet")
    assert rc == 0, err
    for seed in (1, 2):
        assert [(st, e) for s, st, e in seen if s == seed] == [
            ("pretrain", 1),
            ("bb", 1),
            ("dbb", 1),
        ]
    for seed in (1, 2):
        seq = read_results(reproduced[0] / f"seed-{seed}")
        par = read_results(tmp_path / "par" / "tiny-fashion" / f"seed-{seed}")
        for stage in STAGES:
            a, b = seq["stages"][stage], par["stages"][stage]
            assert a["threads"] == b["threads"] == 1
            untimed = lambda r: [h | {"seconds": 0} for h in r["history"]]  # noqa: E731
            assert untimed(a) == untimed(b), (seed, stage)
            assert (a["error"], a["units"], a["active"]) == (b["error"], b["units"], b["active"])
