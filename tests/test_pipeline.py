"""The whole pipeline on small synthetic data: stages, files, resume, refusals."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from forked import forked, needs_fork
from torch import Tensor, nn

from bbdrop.attach import gated_layers
from bbdrop.config import RunConfig, apply_overrides, load_config
from bbdrop.data import Dataset
from bbdrop.gates import base
from bbdrop.pipeline import STAGES, run_pipeline, stage_model
from bbdrop.train.checkpoint import load_checkpoint
from bbdrop.train.loop import DivergenceError


def synthetic(n_train: int = 300, n_test: int = 100) -> Dataset:
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    x = (protos[y] + 0.3 * torch.rand(n_train + n_test, 1, 28, 28, generator=g)).clamp(0, 1)
    return Dataset.from_tensors(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


_TINY = ("epochs.pretrain=2", "epochs.sparsify=2", "epochs.dbb=1", "device=cpu",
         "optim.batch_size=50")  # fmt: skip
CFG = apply_overrides(RunConfig(), _TINY)


@pytest.fixture(scope="module")
def _straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, run_pipeline(CFG, out, synthetic())


@pytest.fixture
def straight(_straight_run: tuple[Path, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """A run of every stage of CFG on synthetic() that was never interrupted, made once for
    the tests that compare with one: its folder (read only: copy it to run in it) and the
    results run_pipeline returned (a copy for each test)."""
    out, results = _straight_run
    return out, copy.deepcopy(results)


def _copy_of(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


@pytest.mark.slow
def test_full_run_writes_every_stage(straight: tuple[Path, dict[str, Any]]) -> None:
    run, results = straight
    assert list(results["stages"]) == list(STAGES)
    files = sorted(p.name for p in run.iterdir())
    assert files == sorted([".lock", "config.toml", "results.json", *(f"{s}.pt" for s in STAGES)])
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    pre, bb, dbb, pp = (results["stages"][s] for s in STAGES)
    assert pre["units"] == {}
    assert set(bb["units"]) == {"fc1", "fc2", "fc3"}
    assert all(0 < bb["units"][k] <= n for k, n in (("fc1", 784), ("fc2", 500), ("fc3", 300)))
    assert len(bb["history"]) == 2 and len(dbb["history"]) == 1
    assert (pre["speedup"], pre["memory"]) == (1.0, 1.0)
    assert bb["speedup"] >= 1.0 and dbb["speedup"] >= bb["speedup"] * 0.99
    assert pre["parameters"] == 784 * 500 + 500 + 500 * 300 + 300 + 300 * 10 + 10
    assert pre["executed_flops"] == 2 * (784 * 500 + 500 * 300 + 300 * 10)
    assert pre["error"] < 50.0  # the prototypes are easy to tell apart
    assert dbb["active"] and all(v <= bb["units"][k] for k, v in dbb["active"].items())
    assert all(pp["units"][k] <= dbb["units"][k] for k in pp["units"])  # pre-pruning only removes
    # the compacted BB network: its parameters counted here from the units kept (LeNet-500-300
    # has one gate per unit, on the dense layers' inputs), its output the gated one's
    assert pre["compact"] is None
    k1, k2, k3 = (bb["units"][n] for n in ("fc1", "fc2", "fc3"))
    assert bb["compact"]["parameters"] == k1 * k2 + k2 + k2 * k3 + k3 + k3 * 10 + 10
    assert bb["compact"]["flops"] == 2 * (k1 * k2 + k2 * k3 + k3 * 10)
    assert bb["compact"]["max_difference"] < 1e-5 and bb["compact"]["speedup_measured"] > 0
    assert bb["compact"]["latency_compact_ms"] > 0 and bb["compact"]["batch"] == 100
    for stage in STAGES:  # each final checkpoint loads into its stage's structure
        model = stage_model(CFG, stage, 10)
        model.load_state_dict(load_checkpoint(run / f"{stage}.pt")["model"])


@pytest.mark.slow
def test_second_call_reuses_the_checkpoints(
    tmp_path: Path, straight: tuple[Path, dict[str, Any]]
) -> None:
    run, first = _copy_of(straight[0], tmp_path / "run"), straight[1]
    calls = []
    second = run_pipeline(CFG, run, synthetic(), progress=lambda *a: calls.append(a))
    assert calls == []  # nothing trained again
    assert second["stages"] == first["stages"]


@pytest.mark.slow
def test_a_killed_run_resumes_mid_stage(
    tmp_path: Path, straight: tuple[Path, dict[str, Any]]
) -> None:
    uninterrupted = straight[1]

    def kill(stage: str, record, epochs: int) -> None:
        if stage == "bb" and record.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(CFG, tmp_path / "b", synthetic(), progress=kill)
    assert (tmp_path / "b" / "bb.last.pt").exists() and not (tmp_path / "b" / "bb.pt").exists()
    resumed = run_pipeline(CFG, tmp_path / "b", synthetic())
    for stage in STAGES:
        a, b = uninterrupted["stages"][stage], resumed["stages"][stage]
        assert (a["error"], a["units"], a["active"]) == (b["error"], b["units"], b["active"])


@pytest.mark.slow
def test_a_run_stopped_between_stages_resumes_to_the_same_result(
    tmp_path: Path, straight: tuple[Path, dict[str, Any]]
) -> None:
    """The final checkpoint of a stage carries the random states, so the next stage
    draws the same data order and noise as in a run that never stopped."""
    uninterrupted = straight[1]
    run_pipeline(CFG, tmp_path / "b", synthetic(), stages=["pretrain", "bb"])
    assert not (tmp_path / "b" / "dbb.pt").exists()
    resumed = run_pipeline(CFG, tmp_path / "b", synthetic())
    for stage in ("dbb", "preprune"):
        a, b = uninterrupted["stages"][stage], resumed["stages"][stage]
        assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
        assert (a["error"], a["units"], a["active"]) == (b["error"], b["units"], b["active"])


@pytest.mark.slow
def test_one_stage_needs_the_previous_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"starts from the 'pretrain' checkpoint.*--stage pretrain"
    ):
        run_pipeline(CFG, tmp_path, synthetic(), stages=["bb"])
    run_pipeline(CFG, tmp_path, synthetic(), stages=["pretrain"])
    results = run_pipeline(CFG, tmp_path, synthetic(), stages=["bb"])
    assert list(results["stages"]) == ["pretrain", "bb"]


@pytest.mark.slow
def test_another_configuration_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    run_pipeline(CFG, tmp_path, synthetic(), stages=["pretrain"])
    other = apply_overrides(CFG, ["optim.lr=0.1"])
    with pytest.raises(ValueError, match="another configuration"):
        run_pipeline(other, tmp_path, synthetic())
    for setting in ("data.validation=50", "data.name=mnist", "gate.init_a=9"):
        with pytest.raises(ValueError, match="another configuration"):
            run_pipeline(apply_overrides(CFG, [setting]), tmp_path, synthetic())
    # another device or data location is the same run
    run_pipeline(
        apply_overrides(CFG, ["device=auto", "data.data_dir=/elsewhere"]),
        tmp_path,
        synthetic(),
        stages=["pretrain"],
    )


def test_a_run_that_cannot_start_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bbdrop.data import DatasetNotFoundError

    monkeypatch.setenv("BBDROP_SYSTEM_DATA", "")  # no system folder
    monkeypatch.delenv("BBDROP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = apply_overrides(CFG, [f"data.data_dir={tmp_path / 'empty'}", "data.download=false"])
    with pytest.raises(DatasetNotFoundError):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_validation_evaluates_on_held_out_training_examples(tmp_path: Path) -> None:
    data = synthetic()
    data = dataclasses.replace(data, test_y=(data.test_y + 1) % 10)  # no network gets it right
    cfg = apply_overrides(CFG, ["data.validation=100"])
    held = run_pipeline(cfg, tmp_path / "held", data, stages=["pretrain"])
    tested = run_pipeline(CFG, tmp_path / "test", data, stages=["pretrain"])
    assert held["stages"]["pretrain"]["error"] < 50.0  # measured on the held-out 100
    assert tested["stages"]["pretrain"]["error"] > 50.0  # measured on the test set


def test_hold_out_splits_the_training_set() -> None:
    data = synthetic(n_train=300)
    split = data.hold_out(100)
    assert torch.equal(split.train_x, data.train_x[:200])
    assert torch.equal(split.train_y, data.train_y[:200])
    assert torch.equal(split.test_x, data.train_x[200:])
    assert torch.equal(split.test_y, data.train_y[200:])
    for n in (300, 0, -1):
        with pytest.raises(ValueError, match=rf"data.validation={n}.*training set .* has 300"):
            data.hold_out(n)


@pytest.mark.parametrize(
    ("overrides", "a", "b"),
    [
        ([], 0.3133, 1.0),  # the authors' values
        (["gate.init_a=9"], 9.0, 1.0),
        (["gate.init_a=4", "gate.init_b=2"], 4.0, 2.0),
    ],
)
def test_gate_initial_values_come_from_the_config(overrides: list[str], a: float, b: float) -> None:
    model = stage_model(apply_overrides(CFG, overrides), "bb", 10)
    for _, layer in gated_layers(model):
        assert torch.allclose(layer.gate.a, torch.tensor(a), atol=1e-4)
        assert torch.allclose(layer.gate.b, torch.tensor(b), atol=1e-4)


def test_the_dbb_stage_has_its_own_kl_scale() -> None:
    """The DBB gates do not inherit the BB stage's KL scales (conv x24 here): the
    authors' DBB stage weights its KL by 1, and gate.dbb_kl_scale sets it."""
    cfg = apply_overrides(RunConfig(), ["model.name=lenet5_caffe", "gate.conv_kl_scale=24"])
    bb = {n: g.gate.kl_scale for n, g in gated_layers(stage_model(cfg, "bb", 10))}
    assert bb == {"conv1": 24.0, "conv2": 24.0, "fc1": 1.0, "fc2": 1.0}
    dbb = {n: g.gate.kl_scale for n, g in gated_layers(stage_model(cfg, "dbb", 10))}
    assert dbb == dict.fromkeys(bb, 1.0)
    cfg3 = apply_overrides(cfg, ["gate.dbb_kl_scale=3"])
    assert {g.gate.kl_scale for _, g in gated_layers(stage_model(cfg3, "dbb", 10))} == {3.0}


Register = Callable[[str, type[base.Gate]], object]


@pytest.fixture
def registering() -> Iterator[Register]:
    """``registering(name, cls)``: a made-up method registered for the test only."""
    with contextlib.ExitStack() as stack:
        yield lambda name, cls: stack.enter_context(base.registered_gate(name, cls))


class _HalfGate(base.Gate):
    """A made-up static method: every unit times 0.5, no regulariser."""

    def mask(self, x: Tensor) -> Tensor:
        return self.gate_values()

    def regularizer(self, layer: nn.Module) -> Tensor:
        return torch.zeros(())

    def gate_values(self) -> Tensor:
        return torch.full((self.num_units,), 0.5) * self.static_keep


@pytest.mark.slow
def test_pretrain_then_another_method_is_a_config(tmp_path: Path, registering: Register) -> None:
    registering("half", _HalfGate)
    cfg = apply_overrides(CFG, ["gate.method=half", "epochs.dbb=0"])
    results = run_pipeline(cfg, tmp_path, synthetic())
    assert list(results["stages"]) == ["pretrain", "half"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["half.pt", "pretrain.pt"]
    model = stage_model(cfg, "half", 10)
    assert {type(g.gate) for _, g in gated_layers(model)} == {_HalfGate}
    model.load_state_dict(load_checkpoint(tmp_path / "half.pt")["model"])


def test_a_method_dbb_cannot_start_from_fails_before_training(
    tmp_path: Path, registering: Register
) -> None:
    registering("half", _HalfGate)
    with pytest.raises(TypeError, match="DBB starts from a BetaBernoulliGate, got _HalfGate"):
        run_pipeline(apply_overrides(CFG, ["gate.method=half"]), tmp_path, synthetic())
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_unknown_stage_names_the_stages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown stage 'sbp'.*pretrain, bb, dbb, preprune"):
        run_pipeline(CFG, tmp_path, synthetic(), stages=["sbp"])


@pytest.mark.slow
def test_every_stage_records_its_torch_version_and_both_counting_rules(
    straight: tuple[Path, dict[str, Any]],
) -> None:
    results = straight[1]
    for stage in STAGES:
        r = results["stages"][stage]
        assert (r["torch"], r["compile"], r["device"]) == (torch.__version__, False, "cpu")
        for key in ("speedup", "speedup_authors", "memory", "memory_authors",
                    "memory_params", "memory_params_authors"):  # fmt: skip
            assert r[key] > 0
        # an MLP has no flatten boundary: the two counting rules agree
        assert r["speedup"] == r["speedup_authors"]


def _run(out: str, *overrides: str) -> None:
    """A run of the pipeline on synthetic data that, with $DIE_IN set, dies after that
    stage's first epoch, like kill -9 after the epoch's checkpoint."""
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (400,), generator=g)
    x = (protos[y] + 0.3 * torch.rand(400, 1, 28, 28, generator=g)).clamp(0, 1)
    data = Dataset.from_tensors(x[:300], y[:300], x[300:], y[300:], 10)
    cfg = apply_overrides(RunConfig(), list(overrides))

    def die(stage: str, record: object, epochs: int) -> None:
        if stage == os.environ.get("DIE_IN") and record.epoch == 1:
            os._exit(9)

    run_pipeline(cfg, out, data, progress=die)


@pytest.mark.slow
@needs_fork
def test_a_process_killed_between_epochs_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Four processes (forked: tests/forked.py): one runs straight through; one dies after
    the first epoch of BB, a fresh one resumes it and dies after the first epoch of DBB,
    and a last one resumes that. Every final tensor is identical to the straight run's,
    bit for bit."""
    settings = ["epochs.pretrain=2", "epochs.sparsify=2", "epochs.dbb=2", "device=cpu",
                "optim.batch_size=50"]  # fmt: skip
    stderr = tmp_path / "stderr"

    def run(out: Path, die: str = "") -> int:
        proc = forked(_run, str(out), *settings, env={"DIE_IN": die}, stderr=stderr)
        proc.join(300)
        return proc.exitcode

    straight = forked(_run, str(tmp_path / "straight"), *settings, env={"DIE_IN": ""},
                      stderr=stderr)  # fmt: skip
    try:
        killed = tmp_path / "killed"
        for die_in in ("bb", "dbb"):
            assert run(killed, die_in) == 9
            assert (killed / f"{die_in}.last.pt").exists()
            assert not (killed / f"{die_in}.pt").exists()
        assert (killed / "bb.pt").exists()  # the second process resumed BB and finished it
        assert run(killed) == 0
        straight.join(300)
        assert straight.exitcode == 0, stderr.read_text()
    finally:
        straight.kill()
        straight.join()
    for stage in STAGES:
        a = load_checkpoint(tmp_path / "straight" / f"{stage}.pt")
        b = load_checkpoint(killed / f"{stage}.pt")
        assert a["model"].keys() == b["model"].keys()
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), (stage, name)
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
        strip = lambda r: [h | {"seconds": 0} for h in r["history"]]  # noqa: E731
        assert strip(a["result"]) == strip(b["result"])


class _OwnDefaults(_HalfGate):
    """A method whose own defaults differ from BB's."""

    def __init__(self, num_units: int, kl_scale: float = 1.0, threshold: float = 3.0) -> None:
        super().__init__(num_units, kl_scale)
        self.threshold = threshold


def test_unset_gate_settings_keep_the_methods_own_defaults(registering: Register) -> None:
    registering("own", _OwnDefaults)
    cfg = apply_overrides(CFG, ["gate.method=own", "epochs.dbb=0"])
    assert {g.gate.threshold for _, g in gated_layers(stage_model(cfg, "own", 10))} == {3.0}
    set_ = apply_overrides(cfg, ["gate.threshold=0.5"])
    assert {g.gate.threshold for _, g in gated_layers(stage_model(set_, "own", 10))} == {0.5}
    with pytest.raises(ValueError, match=r"gate.alpha = 0.01 does not apply to method 'own'"):
        stage_model(apply_overrides(cfg, ["gate.alpha=0.01"]), "own", 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epochs.pretrain=0", "epochs.sparsify=0", "epochs.dbb=0"], "every stage has 0 epochs"),
        (["epochs.sparsify=0"], "epochs.dbb > 0 needs the sparsification stage"),
        (["gate.method=dbb"], "would train DBB twice"),
    ],
)
def test_stage_tables_that_cannot_run_are_refused(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_pipeline(apply_overrides(CFG, overrides), tmp_path / "run", synthetic())
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_another_configuration_names_the_keys_that_differ(tmp_path: Path) -> None:
    run_pipeline(CFG, tmp_path, synthetic(), stages=["pretrain"])
    with pytest.raises(ValueError, match=r"compile, optim.lr differ"):
        run_pipeline(apply_overrides(CFG, ["optim.lr=0.1", "compile=true"]), tmp_path, synthetic())


@pytest.mark.slow
def test_a_diverging_stage_stops_keeps_its_last_good_epoch_and_writes_no_row(
    tmp_path: Path,
) -> None:
    """optim.lr=1e6 used to exit 0 with every unit pruned and a 109080x speedup in the table."""
    cfg = apply_overrides(CFG, ["epochs.sparsify=3"])
    run_pipeline(cfg, tmp_path, synthetic(), stages=["pretrain"])
    data = synthetic()
    calls = []

    def poison(stage: str, record, epochs: int) -> None:  # after bb's first epoch, NaN data
        calls.append(record.epoch)
        data.train_x[5, 0, 3, 3] = float("nan")

    with pytest.raises(DivergenceError, match=r"stage 'bb' diverged in epoch 2: the "
                       r"training loss is nan.*the checkpoint of epoch 1 is kept in "
                       r".*bb.last.pt"):  # fmt: skip
        run_pipeline(cfg, tmp_path, data, progress=poison)
    assert calls == [1]
    assert load_checkpoint(tmp_path / "bb.last.pt")["epoch"] == 1
    assert not (tmp_path / "bb.pt").exists()
    assert list(json.loads((tmp_path / "results.json").read_text())["stages"]) == ["pretrain"]


def test_exploding_rates_are_a_divergence_not_a_record_speedup(tmp_path: Path) -> None:
    cfg = apply_overrides(CFG, ["optim.lr=1e6", "optim.gate_lr=1e6"])
    with pytest.raises(DivergenceError, match=r"stage 'pretrain' diverged in epoch 1: the "
                       r"(mean cross-entropy is .* nats, over 100 times a uniform guess's 2.30|"
                       r"training loss is (nan|inf)).*optim.lr=1e\+06.*nothing of this stage "
                       r"was kept"):  # fmt: skip
        run_pipeline(cfg, tmp_path, synthetic())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "config.toml"]


@pytest.mark.slow
def test_a_network_at_chance_is_flagged_in_results_and_table(tmp_path: Path) -> None:
    from bbdrop.experiments import markdown_table
    from bbdrop.pipeline import chance_error

    data = synthetic()
    noise = dataclasses.replace(  # labels that the inputs say nothing about
        data, test_y=torch.randint(0, 10, data.test_y.shape, generator=torch.Generator())
    )
    cfg = apply_overrides(CFG, ["epochs.sparsify=0", "epochs.dbb=0"])
    learned = run_pipeline(cfg, tmp_path / "a", data)["stages"]
    guessed = run_pipeline(cfg, tmp_path / "b", noise)
    assert not learned["pretrain"]["at_chance"]
    assert guessed["stages"]["pretrain"]["at_chance"]
    assert guessed["stages"]["pretrain"]["chance_error"] == chance_error(noise.test_y, 10)
    counts = torch.bincount(noise.test_y, minlength=10)
    assert chance_error(noise.test_y, 10) == 100.0 * (1 - counts.max().item() / 100)
    table = markdown_table([guessed])
    assert "(at chance: 1 of 1)" in table.splitlines()[2]  # the Original row
    assert "at chance" not in markdown_table([{"stages": learned}]).splitlines()[2]


@pytest.mark.slow
def test_limit_train_trains_on_the_first_examples_only(tmp_path: Path) -> None:
    data = synthetic()
    cfg = apply_overrides(CFG, ["data.limit_train=120", "epochs.sparsify=0", "epochs.dbb=0"])
    seen = []
    original = Dataset.train_batches

    def spy(self: Dataset, *args, **kwargs):
        seen.append(self.train_x.shape[0])
        assert torch.equal(self.train_x, data.train_x[:120])
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Dataset, "train_batches", spy)
        run_pipeline(cfg, tmp_path / "a", data)
    assert seen == [120]
    with pytest.raises(ValueError, match=r"data\.limit_train=301 exceeds the 300 training"):
        run_pipeline(apply_overrides(cfg, ["data.limit_train=301"]), tmp_path / "b", data)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "threads"), [(None, 1), ("threads=2", 2)])
@pytest.mark.usefixtures("all_cores")
def test_threads_are_chosen_recorded_and_restored(
    tmp_path: Path, setting: str | None, threads: int
) -> None:
    """LeNet-500-300 at batch 50 is a small network: one thread unless asked (threads=2:
    the machine's two cores, not a parallel worker's share: the all_cores fixture)."""
    before = torch.get_num_threads()
    cfg = apply_overrides(
        CFG, ["epochs.sparsify=0", "epochs.dbb=0", *([setting] if setting else [])]
    )
    results = run_pipeline(cfg, tmp_path, synthetic())
    assert results["stages"]["pretrain"]["threads"] == threads
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_reproduce_compares_methods_from_one_pretrained_network(
    tmp_path: Path, registering: Register
) -> None:
    """--methods: one pretraining per seed, copied to every method's folder; one row per
    method in the paper's order; bb and dbb share one run."""
    from bbdrop.experiments import markdown_table, reproduce

    registering("half", _HalfGate)
    trained: list[tuple[int, str]] = []

    def progress(seed: int):
        return lambda stage, record, epochs: trained.append((seed, stage))

    out = reproduce("lenet-500-300-fashion-cpu", [1, 2], tmp_path, [*_TINY], data=synthetic(),
                    progress=progress, figures=False, methods=["dbb", "half", "bb"])  # fmt: skip
    for seed in (1, 2):
        stages = [s for k, s in trained if k == seed]  # per epoch: 2, 2, 2, 1
        assert stages == ["pretrain"] * 2 + ["half"] * 2 + ["bb"] * 2 + ["dbb"]
        root = tmp_path / "lenet-500-300-fashion-cpu"
        pre = [(root / m / f"seed-{seed}" / "pretrain.pt").read_bytes() for m in ("bb", "half")]
        assert pre[0] == pre[1]  # the same network, trained once
    assert list(out["runs"][0]["stages"]) == ["pretrain", "half", "bb", "dbb", "preprune"]
    labels = [line.split("|")[1].strip() for line in out["table"].splitlines()[4:8]]
    assert labels == ["Original", "HALF", "BB", "DBB"]
    assert out["table"] == markdown_table(out["runs"], "lenet-500-300-fashion-cpu, seeds 1 2")
    # a later call with another method starts from the pretrained networks already there
    registering("other", _HalfGate)
    trained.clear()
    reproduce("lenet-500-300-fashion-cpu", [2], tmp_path, [*_TINY], data=synthetic(),
              progress=progress, figures=False, methods=["other"])  # fmt: skip
    assert [s for _, s in trained] == ["other"] * 2
    got = (tmp_path / "lenet-500-300-fashion-cpu" / "other" / "seed-2" / "pretrain.pt").read_bytes()
    assert got == (root / "bb" / "seed-2" / "pretrain.pt").read_bytes()
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available: .*half"):
        reproduce("lenet-500-300-fashion-cpu", [1], tmp_path, methods=["nope"])


def test_select_scale_follows_the_written_rule() -> None:
    from bbdrop.experiments import SELECTION_MARGIN, select_scale

    def pt(scale: float, seed: int, error: float, speedup: float) -> dict:
        return {"scale": scale, "seed": seed, "error": error, "speedup": speedup,
                "dense_error": 10.0}  # fmt: skip

    assert SELECTION_MARGIN == 0.5
    points = [pt(1, 1, 10.2, 2.0), pt(1, 2, 10.4, 2.2),  # medians 10.3, 2.1: allowed
              pt(3, 1, 10.4, 4.0), pt(3, 2, 10.6, 4.4),  # 10.5, 4.2: allowed, fastest
              pt(9, 1, 10.4, 9.0), pt(9, 2, 10.8, 9.9)]  # 10.6 > 10.5: not allowed  # fmt: skip
    assert select_scale(points) == 3
    assert select_scale([pt(1, 1, 12.0, 2.0), pt(3, 1, 11.0, 5.0)]) == 3  # none: lowest error


def test_a_sweep_scales_every_weight_of_the_regulariser() -> None:
    """kl_scale, conv_kl_scale and the per-layer weights (absolute values) move together;
    for dbb only the DBB stage's weight moves."""
    from bbdrop.experiments import _scaled

    cfg = apply_overrides(CFG, ["gate.kl_scale=0.5", "gate.conv_kl_scale=4",
                                "gate.layer_kl_scale.conv1=30", "gate.dbb_kl_scale=2"])  # fmt: skip
    g = _scaled(cfg, "bb", 0.1).gate
    assert (g.kl_scale, g.conv_kl_scale, g.layer_kl_scale) == (0.05, 0.4, {"conv1": 3.0})
    assert g.dbb_kl_scale == 2
    g = _scaled(cfg, "dbb", 3).gate
    assert (g.kl_scale, g.conv_kl_scale, g.layer_kl_scale, g.dbb_kl_scale) == (
        0.5, 4, {"conv1": 30}, 6)  # fmt: skip


@pytest.mark.slow
def test_a_sweep_runs_on_held_out_data_from_one_pretraining_and_draws_the_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bbdrop.experiments import sweep

    data = synthetic()
    data = dataclasses.replace(data, test_y=(data.test_y + 1) % 10)  # the test set: never read
    scales = [0.001, 0.0010000001]  # equal to 6 digits: kept apart, recorded exactly
    done = sweep("lenet-500-300-fashion-cpu", "bb", scales, [1], tmp_path,
                 [*_TINY, "epochs.dbb=0"], validation=100, data=data)  # fmt: skip
    record = done["record"]
    assert [p["scale"] for p in record["points"]] == scales
    assert [p["kl_scale"] for p in record["points"]] == scales  # the base weight is 1
    # measured on the held-out examples: on the (relabelled) test set it would be > 50
    assert all(p["dense_error"] < 50 for p in record["points"])
    assert record["chosen_scale"] in scales
    root = tmp_path / "lenet-500-300-fashion-cpu" / "sweep"
    folders = sorted(p.name for p in (root / "bb").iterdir() if p.is_dir())
    assert folders == ["x0.001", "x0.0010000001"]
    pre = [(root / "bb" / name / "seed-1" / "pretrain.pt").read_bytes() for name in folders]
    assert pre[0] == pre[1]
    chosen = load_config(root / "bb" / "chosen.toml")
    assert chosen.data.validation == 0 and chosen.gate.kl_scale == record["chosen_scale"]
    assert (root / "front.png").exists() and (root / "units.png").exists()
    from bbdrop.experiments import write_front

    tested = [
        {
            "stages": {
                "bb": {
                    "speedup": 2.0,
                    "error": 10.0,
                    "active": None,
                    "units": {"fc1": 5, "fc2": 3, "fc3": 2},
                }
            }
        }
    ]  # one seed's run
    assert [p.name for p in write_front(root, tested)] == ["front.png", "front.pdf",
                                                           "units.png", "units.pdf"]  # fmt: skip


def test_tested_runs_reads_a_reproduce_folder_back_per_seed(tmp_path: Path) -> None:
    from bbdrop.experiments import tested_runs

    def write(method: str, seed: int, errors: dict[str, float]) -> None:
        folder = tmp_path / method / f"seed-{seed}"
        folder.mkdir(parents=True)
        figures = dict.fromkeys(("speedup", "speedup_authors", "memory_authors",
                                 "memory_params_authors", "seconds_per_epoch"), 1.0)  # fmt: skip
        stages = {s: {**figures, "error": e, "units": {}, "active": {}} for s, e in errors.items()}
        (folder / "results.json").write_text(json.dumps({"stages": stages}))

    for seed in (2, 1):
        write("bb", seed, {"pretrain": seed, "bb": 10 + seed})
        write("vib", seed, {"pretrain": seed, "vib": 20 + seed})
    runs = tested_runs(tmp_path)
    assert [list(r["stages"]) for r in runs] == [["pretrain", "vib", "bb"]] * 2
    assert [r["stages"]["vib"]["error"] for r in runs] == [21, 22]  # in the order of seeds


@pytest.mark.slow
def test_a_dbb_sweep_trains_bb_once_per_seed_and_later_sweeps_reuse_the_pretraining(
    tmp_path: Path,
) -> None:
    """Scales of gate.dbb_kl_scale leave pretraining and BB unchanged: both run once per
    seed and their checkpoints serve every scale; only the DBB stage runs per scale."""
    from bbdrop.experiments import sweep

    trained: list[tuple[int, str]] = []

    def progress(seed: int):
        return lambda stage, record, epochs: trained.append((seed, stage))

    done = sweep("lenet-500-300-fashion-cpu", "dbb", [0.1, 1.0, 10.0], [1], tmp_path, [*_TINY],
                 validation=100, data=synthetic(), progress=progress)  # fmt: skip
    assert [s for _, s in trained] == ["pretrain"] * 2 + ["bb"] * 2 + ["dbb"] * 3
    root = tmp_path / "lenet-500-300-fashion-cpu" / "sweep" / "dbb"
    bb = {(root / f"x{x:g}" / "seed-1" / "bb.pt").read_bytes() for x in (0.1, 1, 10)}
    assert len(bb) == 1
    points = done["record"]["points"]
    assert [p["scale"] for p in points] == [0.1, 1.0, 10.0]
    # a second sweep of the experiment starts from the first one's pretrained network,
    # and from its BB where that is the same computation (DBB's settings aside)
    trained.clear()
    sweep("lenet-500-300-fashion-cpu", "bb", [3.0, 1.0], [1], tmp_path, [*_TINY, "epochs.dbb=0"],
          validation=100, data=synthetic(), progress=progress)  # fmt: skip
    assert [s for _, s in trained] == ["bb"] * 2  # scale 3 only: scale 1 is the DBB sweep's BB
    for stage in ("pretrain", "bb"):
        got = root.parent / "bb" / "x1" / "seed-1" / f"{stage}.pt"
        assert got.read_bytes() == (root / "x1" / "seed-1" / f"{stage}.pt").read_bytes()
    trained.clear()  # other pretraining settings: pretrained anew
    sweep("lenet-500-300-fashion-cpu", "l0", [1.0], [1], tmp_path,
          [*_TINY, "epochs.dbb=0", "optim.weight_decay=0"], validation=100, data=synthetic(),
          progress=progress)  # fmt: skip
    assert [s for _, s in trained] == ["pretrain"] * 2 + ["l0"] * 2
    configs = [load_config(root / f"x{x:g}" / "seed-1" / "config.toml") for x in (0.1, 1, 10)]
    from bbdrop.experiments import experiment_config

    weight = experiment_config("lenet-500-300-fashion-cpu").gate.dbb_kl_scale
    assert [c.gate.dbb_kl_scale for c in configs] == pytest.approx([0.1 * weight, weight,
                                                                    10 * weight])  # fmt: skip


@pytest.mark.slow
def test_an_in_progress_checkpoint_left_beside_a_final_one_is_removed(tmp_path: Path) -> None:
    """A kill between saving bb.pt and removing bb.last.pt (found by the crash test)."""
    cfg = apply_overrides(CFG, ["epochs.dbb=0"])
    run_pipeline(cfg, tmp_path, synthetic())
    (tmp_path / "bb.last.pt").write_bytes((tmp_path / "bb.pt").read_bytes())
    run_pipeline(cfg, tmp_path, synthetic())
    assert not (tmp_path / "bb.last.pt").exists()


@pytest.mark.slow
def test_fronts_of_sweeps_from_different_dense_networks_are_drawn_against_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two records whose seed-1 dense networks differ (two machines): each error is drawn
    as its excess over its own dense network's, the test-set stars likewise."""
    from bbdrop import plots
    from bbdrop.experiments import write_front

    drawn: dict = {}
    from matplotlib.figure import Figure

    monkeypatch.setattr(plots, "plot_front", lambda *a: drawn.update(args=a) or Figure())
    for method, dense in (("bb", 10.0), ("vib", 11.0)):
        points = [{"scale": x, "seed": 1, "error": dense + x, "speedup": 2 * x,
                   "dense_error": dense, "units": {"fc1": 5}} for x in (1.0, 2.0)]  # fmt: skip
        (tmp_path / method).mkdir()
        (tmp_path / method / "sweep.json").write_text(
            json.dumps({"name": "x", "method": method, "chosen_scale": 1.0, "points": points})
        )
    tested = [{"stages": {"pretrain": {"error": 9.0},
                          "vib": {"error": 9.5, "speedup": 3.0, "active": None,
                                  "units": {"fc1": 4}}}}]  # fmt: skip
    write_front(tmp_path, tested)
    curves, chosen, dense, _, margin, ylabel = drawn["args"]
    assert curves == {m: [{"speedup": 2.0, "error": 1.0}, {"speedup": 4.0, "error": 2.0}]
                      for m in ("bb", "vib")}  # fmt: skip
    assert chosen["vib"] == [{"speedup": 3.0, "error": 0.5}] and chosen["bb"] == []
    assert dense == 0.0 and margin == 0.5 and "minus the dense" in ylabel
    # one dense network for all: absolute errors
    (tmp_path / "vib" / "sweep.json").unlink()
    write_front(tmp_path)
    curves, chosen, dense, _, _, ylabel = drawn["args"]
    assert curves["bb"][0]["error"] == 11.0 and dense == 10.0 and ylabel == "error (%)"


def test_a_stage_that_cannot_be_compacted_records_why() -> None:
    """A stage whose gates prune every unit of a layer has no network to compact: its
    results say so instead of failing the run."""
    from bbdrop.pipeline import compact_figures

    model = stage_model(CFG, "bb", 10)
    model.fc2.gate.prune_(torch.zeros(500, dtype=torch.bool))
    assert compact_figures(model, synthetic()) == {
        "error": "gated layer 'fc2' keeps no unit: the model is untrained or its training "
        "diverged (check the run's error), so there is no network to compact"
    }
    assert compact_figures(stage_model(CFG, "pretrain", 10), synthetic()) is None


@pytest.mark.slow
def test_a_stage_finished_before_the_compact_measurement_stays_finished(
    tmp_path: Path, straight: tuple[Path, dict[str, Any]]
) -> None:
    """Checkpoints written before results had a 'compact' entry are still finished stages:
    a new call resumes from them instead of refusing (or training them again)."""
    from bbdrop.train.checkpoint import save_checkpoint

    run, first = _copy_of(straight[0], tmp_path / "run"), straight[1]
    for stage in STAGES:  # as an earlier bbdrop wrote them
        path = run / f"{stage}.pt"
        state = load_checkpoint(path)
        state["result"].pop("compact")
        save_checkpoint(state, path)
    calls = []
    again = run_pipeline(CFG, run, synthetic(), progress=lambda *a: calls.append(a))
    assert calls == []  # nothing trained again
    assert all("compact" not in again["stages"][s] for s in STAGES)
    assert {s: again["stages"][s]["error"] for s in STAGES} == {
        s: first["stages"][s]["error"] for s in STAGES}  # fmt: skip
