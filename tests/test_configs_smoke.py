"""Every shipped experiment configuration runs the whole pipeline for one batch per stage,
on a few images written in its data set's real format (IDX for MNIST and Fashion-MNIST,
the python pickle batches for CIFAR) and read through the real loader."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import smallfiles

from bbdrop.experiments import experiment_config, list_experiments
from bbdrop.models import create_model
from bbdrop.pipeline import pipeline_stages, run_pipeline
from bbdrop.stage_figures import without_compaction

# Training images, one batch per epoch (the batch size is set to this): fewer of CIFAR,
# whose VGG takes about a second a batch of 10 on one CPU thread.
N_TRAIN = {"mnist": 10, "fashion-mnist": 10, "cifar10": 5, "cifar100": 4}
# Gated layers of each network: fully connected layers by their inputs, convolutions by
# their output channels (LeNet-500-300: 3 gates; LeNet5-Caffe: 4; VGG-like: 15).
GATED = {
    "lenet_500_300": {"fc1": 784, "fc2": 500, "fc3": 300},
    "lenet5_caffe": {"conv1": 20, "conv2": 50, "fc1": 800, "fc2": 500},
    "vgg_like": {
        **{
            f"features.conv{i + 1}": c
            for i, c in enumerate([64, 64, 128, 128, 256, 256, 256] + [512] * 6)
        },
        "classifier.fc1": 512,
        "classifier.fc2": 512,
    },
}
CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
# Test images: 7 of MNIST (an error of k/7 tells them from the 10 training images);
# CIFAR's follow from the training batches (smallfiles.write_cifar_dataset).
N_TEST = {"mnist": 7, "fashion-mnist": 7, "cifar10": 1, "cifar100": 2}


@functools.cache
def experiments() -> tuple[str, ...]:
    """Shipped configs that cover every (network, method) pair and every data set: each
    runs a whole pipeline (marked slow; the VGG ones take seconds). Chosen greedily: the
    config adding the most pairs and data sets not yet covered, then the one with the
    fewest stages (a baseline stops after its own), then by name. The others differ from
    one of these only in names, epochs or tuned numbers, which
    test_every_shipped_config_parses_and_its_stages_can_run checks without training
    (and the VGG configs on CIFAR-100 are their CIFAR-10 twins:
    test_the_cifar100_configs_are_their_cifar10_twins_on_cifar100)."""
    covers = {}
    for name in list_experiments():
        cfg = experiment_config(name)
        keys = {("pair", cfg.model.name, cfg.gate.method), ("data", cfg.data.name)}
        covers[name] = (keys, len(pipeline_stages(cfg)))
    chosen: list[str] = []
    seen: set[tuple[str, ...]] = set()
    while True:
        name = min(covers, key=lambda n: (-len(covers[n][0] - seen), covers[n][1], n))
        if not covers[name][0] - seen:
            return tuple(sorted(chosen))
        chosen.append(name)
        seen |= covers[name][0]


@pytest.fixture(autouse=True)
def hermetic_data_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the data_dir given is searched: not $BBDROP_DATA, the user cache or the
    system folder, so that the files read are the ones written here."""
    monkeypatch.delenv("BBDROP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("BBDROP_SYSTEM_DATA", "")  # no system folder


def test_the_shipped_configs_are_the_paper_and_cpu_protocols() -> None:
    names = list_experiments()
    assert {
        "lenet-500-300-mnist",
        "lenet5-caffe-mnist",
        "vgg-cifar10",
        "vgg-cifar100",
        "lenet-500-300-fashion-cpu",
        "lenet5-caffe-fashion-cpu",
    } <= set(names)
    for name in names:
        cfg = experiment_config(name)
        assert cfg.name == name  # reproduce writes to <out>/<cfg.name>
        assert cfg.model.name in GATED and cfg.data.name in CLASSES
        assert min(cfg.epochs.pretrain, cfg.epochs.sparsify) > 0
        assert cfg.epochs.dbb > 0 or cfg.gate.method != "bb"  # the baselines stop at theirs


@pytest.mark.parametrize("name", list_experiments())
def test_every_shipped_config_parses_and_its_stages_can_run(name: str) -> None:
    """Every shipped config, including those not run below: it loads, names its own
    run folder, and its stage table can run (a DBB stage only after BB, etc.)."""
    cfg = experiment_config(name)
    assert cfg.name == name
    stages = [s.name for s in pipeline_stages(cfg)]
    assert stages[:2] == ["pretrain", cfg.gate.method]
    assert ("dbb" in stages) == (cfg.gate.method == "bb" and cfg.epochs.dbb > 0)


def test_the_smoke_runs_cover_every_network_method_and_data_set() -> None:
    runs = [experiment_config(n) for n in experiments()]
    every = [experiment_config(n) for n in list_experiments()]
    assert {(c.model.name, c.gate.method) for c in runs} == {
        (c.model.name, c.gate.method) for c in every
    }
    assert {c.data.name for c in runs} == {c.data.name for c in every}


@pytest.mark.parametrize(
    "name", [name for name in list_experiments() if name.startswith("vgg-cifar100")]
)
def test_the_cifar100_configs_are_their_cifar10_twins_on_cifar100(name: str) -> None:
    """A VGG config on CIFAR-100 differs from its CIFAR-10 twin in its name, data set and
    epoch counts only (one of the two runs below); the 100 classes come from the data set."""
    cfg = experiment_config(name)
    twin = experiment_config(name.replace("cifar100", "cifar10"))
    assert (cfg.data.name, twin.data.name) == ("cifar100", "cifar10")
    assert cfg.gate.method == twin.gate.method
    moved = dataclasses.replace(
        cfg, name=twin.name, data=dataclasses.replace(cfg.data, name="cifar10"), epochs=twin.epochs
    )
    assert moved == twin


@pytest.mark.slow
@pytest.mark.parametrize("name", experiments())
def test_one_batch_per_stage(name: str, tmp_path: Path) -> None:
    shipped = experiment_config(name)
    n_train = N_TRAIN[shipped.data.name]
    smallfiles.write_dataset(tmp_path / "data", shipped.data.name, n_train,
                             N_TEST[shipped.data.name])  # fmt: skip
    cfg = experiment_config(
        name,
        [
            "epochs.pretrain=1",
            "epochs.sparsify=1",
            f"epochs.dbb={min(1, shipped.epochs.dbb)}",
            "device=cpu",
            "threads=1",  # not chosen from a FLOP count: one count less a run
            f"data.data_dir={tmp_path / 'data'}",
            "data.download=false",
            "data.verify=false",
            f"optim.batch_size={n_train}",
        ],
    )
    # the overrides change nothing else of the shipped experiment
    assert (cfg.model, cfg.data.name, cfg.gate) == (shipped.model, shipped.data.name, shipped.gate)

    out = tmp_path / "run"
    with without_compaction():  # whether the stages train, not how they compact
        returned = run_pipeline(cfg, out)
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    stages = [s.name for s in pipeline_stages(cfg)]
    assert stages[:2] == ["pretrain", cfg.gate.method]
    assert list(results["stages"]) == stages
    assert results["config"]["optim"]["batch_size"] == n_train
    assert sorted(p.name for p in out.glob("*.pt")) == sorted(f"{s}.pt" for s in stages)

    gated = GATED[cfg.model.name]
    n_test = N_TEST[cfg.data.name]
    dense = create_model(cfg.model.name, num_classes=CLASSES[cfg.data.name])
    for stage, fig in results["stages"].items():
        numbers = [fig[k] for k in ("error", "speedup", "memory", "seconds_per_epoch")]
        numbers += list(fig["units"].values()) + list(fig["active"].values())
        numbers += [v for r in fig["history"] for v in r.values() if isinstance(v, float)]
        assert all(math.isfinite(v) for v in numbers), stage
        assert 0.0 <= fig["error"] <= 100.0
        # the test set evaluated is the one written: the error counts whole images
        wrong = fig["error"] * n_test / 100
        assert wrong == pytest.approx(round(wrong)), (stage, fig["error"])
        assert fig["speedup"] > 0 and fig["memory"] > 0
        assert fig["parameters"] > 0 and fig["executed_flops"] > 0
        assert fig["compact"] is None  # not measured: without_compaction
        if stage == "pretrain":
            assert fig["units"] == {} and fig["active"] == {}
            # the network is built for the data set's classes (100 for CIFAR-100)
            assert fig["parameters"] == sum(p.numel() for p in dense.parameters())
            assert (fig["speedup"], fig["memory"]) == (1.0, 1.0)
        else:
            assert list(fig["units"]) == list(gated), stage
            assert all(0 <= fig["units"][k] <= n for k, n in gated.items()), stage
        if stage in ("dbb", "preprune"):
            assert list(fig["active"]) == list(gated), stage
            assert all(0 <= v <= fig["units"][k] for k, v in fig["active"].items()), stage
        if stage != "preprune":
            assert fig["epochs"] == 1 and len(fig["history"]) == 1, stage
            assert fig["history"][0]["epoch"] == 1 and fig["seconds_per_epoch"] > 0
