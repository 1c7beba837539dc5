"""The corpus of bad inputs and faults: each row is one input and the one-line answer it must get.

A row runs either the ``bbdrop`` command (``argv``) or a Python call (``call``)
in a fresh folder, after an optional ``setup`` that plants files there. It
passes when:

* the command exits with status 2 (the call raises ``exc``), without a traceback;
* the first line of the message matches the row's pattern (``re.search``), so the
  file or setting at fault and the fix are on the line a user reads first;
* nothing was written, changed or left behind (every file's size and mtime are
  compared), unless the row is a fault met mid-run (``writes=True``), whose
  ``after`` check says what must hold instead.

A new check is one more row. Placeholders in ``argv``: ``{tmp}`` the row's
folder, ``{data}`` a tiny Fashion-MNIST in the real file format, ``{run}`` a
finished tiny run copied into the row's folder, ``{out}`` a fresh output folder.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import smallfiles
import torch
from torch import nn

import bbdrop
from bbdrop.cli import main
from bbdrop.config import RunConfig, apply_overrides
from bbdrop.data import (
    ChecksumError,
    Dataset,
    DatasetNotFoundError,
    get_dataset_spec,
    load_dataset,
)
from bbdrop.demo import DemoConfig
from bbdrop.experiments import reproduce, sweep
from bbdrop.gates import create_gate
from bbdrop.pipeline import run_pipeline
from bbdrop.threads import available_cores
from bbdrop.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bbdrop.train.loop import DivergenceError, evaluate, train_stage

SHIPPED = "lenet-500-300-fashion-cpu"
TINY = ("epochs.pretrain=1", "epochs.sparsify=1", "epochs.dbb=1", "device=cpu",
        "optim.batch_size=50")  # fmt: skip
N_TRAIN, N_TEST = 200, 50
CORES = available_cores()


@dataclass(frozen=True)
class Env:
    tmp: Path  # the row's folder (also the working directory)
    data: Path  # a root holding fashion-mnist/ (tiny, real format, not the published bytes)
    finished: Path  # a finished tiny run of SHIPPED with TINY, shared: never written to
    out: Path  # tmp/out: does not exist
    mp: pytest.MonkeyPatch  # for setups that change the environment
    copied: list[Path] = dataclasses.field(default_factory=list)

    @property
    def run(self) -> Path:
        """tmp/run: a copy of ``finished`` (mtimes kept), made when the row first asks for
        it (most rows never do: 9 MB copied and hashed twice per row is seconds)."""
        if not self.copied:
            shutil.copytree(self.finished, self.tmp / "run")
            self.copied.append(self.tmp / "run")
        return self.copied[0]

    def data_args(self) -> list[str]:
        return [f"data.data_dir={self.data}", "data.download=false", "data.verify=false"]

    def run_argv(self, *extra: str, out: Path | None = None) -> list[str]:
        return ["run", SHIPPED, *TINY, *self.data_args(), *extra, "--out",
                str(out or self.out), "--quiet"]  # fmt: skip


@dataclass(frozen=True)
class Row:
    id: str
    error: str  # pattern searched in the first line of the message
    argv: Callable[[Env], Sequence[str]] | None = None
    call: Callable[[Env], Any] | None = None
    exc: type[BaseException] = Exception
    setup: Callable[[Env], Any] | None = None
    writes: bool = False
    after: Callable[[Env], Any] | None = None


# -- helpers for setups ------------------------------------------------------------------
def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def truncate(path: Path, keep: float = 0.5) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])


def tiny_data(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, side: int = 28) -> Path:
    arrays = smallfiles.datafiles.mnist_arrays(n_train, n_test, seed=0, side=side)
    smallfiles.datafiles.write_mnist(root / "fashion-mnist", arrays, gz=True)
    return root


def idx_file(i: int) -> str:
    """The published name of the i-th Fashion-MNIST file (train images, train labels,
    test images, test labels)."""
    return f"{smallfiles.datafiles.MNIST_NAMES[i]}.gz"


class Planted:
    """Unpickling this runs code: a checkpoint holding it must be refused unread."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def plant_pickle(env: Env, name: str) -> None:
    torch.save({"format": "bbdrop-checkpoint-1", "model": Planted(env.tmp / "pwned")},
               env.run / name)  # fmt: skip


def other_network_checkpoint(env: Env) -> None:
    """pretrain.pt of the run, with the weights of another network in it."""
    state = load_checkpoint(env.run / "pretrain.pt")
    state["model"] = bbdrop.create_model("lenet5_caffe").state_dict()
    save_checkpoint(state, env.run / "pretrain.pt")


def half_run(env: Env) -> None:
    """A run of 3 BB epochs stopped after the first: bb.last.pt, no bb.pt (the tiny run
    has 1 BB epoch)."""
    for name in ("bb.pt", "dbb.pt", "preprune.pt"):
        (env.run / name).unlink()
    state = load_checkpoint(env.run / "pretrain.pt")
    save_checkpoint({"stage": "bb", "epochs": 3, "epoch": 1, "model": state["model"]},
                    env.run / "bb.last.pt")  # fmt: skip


def no_result_row(stage: str) -> Callable[[Env], None]:
    def check(env: Env) -> None:
        results = env.out / "results.json"
        if results.exists():
            assert stage not in json.loads(results.read_text())["stages"]
        assert not (env.out / f"{stage}.pt").exists()

    return check


def synthetic(n_train: int = 120, n_test: int = 40, nan: bool = False) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_train + n_test, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    if nan:
        x[3, 0, 5, 5] = float("nan")
    return Dataset.from_tensors(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


def mnist_blobs() -> dict[str, bytes]:
    """The four MNIST files, gzipped, as a mirror would serve them."""
    arrays = smallfiles.datafiles.mnist_arrays(20, 10, seed=1)
    return {f"{n}.gz": gzip.compress(smallfiles.datafiles.idx_bytes(a), mtime=0)
            for n, a in arrays.items()}  # fmt: skip


def download_from(
    env: Env, served: dict[str, bytes], *, lengths: dict[str, int] | None = None,
    mirror: str | None = None,
) -> Dataset:  # fmt: skip
    """MNIST, whose published files are ``mnist_blobs()``, fetched into an empty folder
    from a local mirror serving ``served`` (or from ``mirror``)."""
    spec = dataclasses.replace(
        get_dataset_spec("mnist"), files=smallfiles.datafiles.remote_files(mnist_blobs())
    )
    if mirror is not None:
        return load_dataset(spec, env.tmp / "root", progress=False, mirrors=[mirror], timeout=5)
    files = {f"/{k}": v for k, v in served.items()}
    with smallfiles.datafiles.serve(files, lengths) as server:
        url = smallfiles.datafiles.url_of(server)
        return load_dataset(spec, env.tmp / "root", progress=False, mirrors=[url], timeout=5)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


CFG = apply_overrides(RunConfig(), [*TINY])
EVAL = (torch.rand(1, 4), torch.zeros(1, dtype=torch.long))


def bad_override(setting: str, error: str, id_: str | None = None) -> Row:
    return Row(id_ or f"override {setting}", error, argv=lambda e: e.run_argv(setting))


def bad_config_file(id_: str, text: str, error: str) -> Row:
    def argv(env: Env) -> list[str]:
        return ["run", str(env.tmp / "c.toml")]

    return Row(id_, error, argv=argv, setup=lambda e: write(e.tmp / "c.toml", text))


# -- the corpus --------------------------------------------------------------------------
ROWS: list[Row] = [
    # the command line itself
    Row("no command", r"required: COMMAND", argv=lambda e: []),
    Row("--out empty", r"argument --out: give a folder, not an empty string",
        argv=lambda e: [*e.run_argv()[:-3], "--out", ""]),
    Row("--threads beyond the cores", rf"argument --threads: must be at most {CORES}, got 100000",
        argv=lambda e: e.run_argv("--threads", "100000")),
    Row("--threads 2**64", rf"argument --threads: must be at most {CORES}",
        argv=lambda e: e.run_argv("--threads", str(2**64))),
    Row("demo --threads beyond the cores", rf"argument --threads: must be at most {CORES}",
        argv=lambda e: ["demo", "--threads", "100000"]),
    Row("unknown command", r"invalid choice: 'frobnicate'", argv=lambda e: ["frobnicate"]),
    Row("run without a config", r"required: CONFIG", argv=lambda e: ["run"]),
    Row("train without --stage", r"required: --stage", argv=lambda e: ["train", SHIPPED]),
    Row("unknown option", r"unrecognized arguments: --bogus",
        argv=lambda e: e.run_argv("--bogus")),
    Row("--device tpu", r"argument --device: invalid choice: 'tpu'",
        argv=lambda e: e.run_argv("--device", "tpu")),
    Row("--threads 0", r"argument --threads: must be >= 1, got 0",
        argv=lambda e: e.run_argv("--threads", "0")),
    Row("--threads two", r"argument --threads: expected an integer, got 'two'",
        argv=lambda e: e.run_argv("--threads", "two")),
    Row("--seeds letters", r"seeds must be integers like 1,2,3, got 'a,b'",
        argv=lambda e: ["reproduce", SHIPPED, "--seeds", "a,b", "--out", str(e.out)]),
    Row("--seeds nothing", r"argument --seeds: expected at least one argument",
        argv=lambda e: ["reproduce", SHIPPED, "--seeds"]),
    Row("--seeds repeated", r"seeds repeat: 1, 1; give each seed once",
        argv=lambda e: ["reproduce", SHIPPED, "--seeds", "1,1", *TINY, *e.data_args(),
                        "--out", str(e.out), "--quiet"]),
    Row("sweep --scales 0,1", r"argument --scales: scales must be finite numbers > 0",
        argv=lambda e: ["sweep", SHIPPED, "--method", "bb", "--scales", "0,1"]),
    Row("sweep --scales a", r"argument --scales: scales must be numbers like 0.1,1,10",
        argv=lambda e: ["sweep", SHIPPED, "--method", "bb", "--scales", "a"]),
    Row("sweep of an unknown method", r"unknown method 'nope'; available: .*bb",
        argv=lambda e: ["sweep", SHIPPED, "--method", "nope", "--out", str(e.out)]),
    Row("table of a folder without results", r"holds no results \(seed-\*/results.json",
        argv=lambda e: ["table", str(e.out)]),
    Row("front of a folder without sweeps", r"holds no <method>/sweep.json; give the sweep "
        r"folder bbdrop sweep wrote", argv=lambda e: ["front", str(e.out)]),
    Row("front --tested of a folder without results", r"holds no results \(seed-\*/results.json"
        r" or \*/seed-\*/results.json\); give the folder bbdrop reproduce wrote",
        argv=lambda e: ["front", str(Path(__file__).parents[1] / "docs" / "sweeps" /
                                     "lenet-500-300-fashion-cpu"), "--tested", str(e.out)]),
    Row("reproduce --methods of an unknown one", r"unknown method 'nope'; available:",
        argv=lambda e: ["reproduce", SHIPPED, "--methods", "bb,nope", "--out", str(e.out)]),
    Row("reproduce --methods repeated", r"methods repeat: bb, bb; give each once",
        argv=lambda e: ["reproduce", SHIPPED, "--methods", "bb,bb", "--out", str(e.out)]),
    Row("--jobs 0", r"argument --jobs: must be >= 1, got 0",
        argv=lambda e: ["reproduce", SHIPPED, "--jobs", "0"]),
    Row("demo --seed -1", r"argument --seed: must be >= 0, got -1",
        argv=lambda e: ["demo", "--seed", "-1"]),
    Row("demo --seed 2**64", r"argument --seed: must be at most 9223372036854775807",
        argv=lambda e: ["demo", "--seed", str(2**64)]),
    Row("demo --dense-epochs 0", r"argument --dense-epochs: must be >= 1, got 0",
        argv=lambda e: ["demo", "--dense-epochs", "0"]),
    Row("demo --bb-epochs x", r"argument --bb-epochs: expected an integer, got 'x'",
        argv=lambda e: ["demo", "--bb-epochs", "x"]),
    Row("demo --threads -3", r"argument --threads: must be >= 1, got -3",
        argv=lambda e: ["demo", "--threads", "-3"]),
    # configuration files
    Row("unknown experiment", r"unknown experiment 'lenet-9000'; shipped: .*lenet-500-300",
        argv=lambda e: ["run", "lenet-9000"]),
    Row("missing config file", r"config file '.*nowhere.toml' does not exist",
        argv=lambda e: ["run", str(e.tmp / "nowhere.toml")]),
    Row("config is a folder", r"config '.*folder.toml' is a folder, not a .toml file",
        setup=lambda e: (e.tmp / "folder.toml").mkdir(),
        argv=lambda e: ["run", str(e.tmp / "folder.toml")]),
    Row("config not UTF-8", r"latin.toml: not UTF-8 text \(byte \d+: .*\); save it as UTF-8",
        setup=lambda e: write(e.tmp / "latin.toml", 'name = "caf\xe9"\n'.encode("latin-1")),
        argv=lambda e: ["run", str(e.tmp / "latin.toml")]),
    Row("config not TOML", r"broken.toml: not valid TOML",
        setup=lambda e: write(e.tmp / "broken.toml", "[optim\nlr = "),
        argv=lambda e: ["run", str(e.tmp / "broken.toml")]),
    bad_config_file("config with an unknown key", "[optim]\nlearning_rate = 0.1\n",
                    r"unknown key 'optim.learning_rate'; OptimConfig has:"),
    bad_config_file("config with an unknown table", "[trainer]\nx = 1\n",
                    r"unknown key 'trainer'; RunConfig has:"),
    bad_config_file("config with a string for a number", '[optim]\nlr = "fast"\n',
                    r"optim.lr must be a number, got 'fast'"),
    bad_config_file("config with a table for a value", "[seed]\nx = 1\n",
                    r"seed must be an integer, got \{"),
    bad_config_file("config with the old epochs.bb", "[epochs]\nbb = 3\n",
                    r"epochs.bb was renamed epochs.sparsify"),
    # settings (KEY=VALUE), checked before anything is written
    bad_override("lr", r"override 'lr' is not of the form key=value"),
    bad_override("=3", r"override '=3' is not of the form key=value"),
    bad_override("optim.lrr=1", r"unknown key 'optim.lrr' in override"),
    bad_override("trainer.x=1", r"unknown key 'trainer.x' in override"),
    bad_override("epochs.pretrain=1.5", r"epochs.pretrain must be an integer, got 1.5"),
    bad_override("epochs.pretrain=-1", r"EpochsConfig.pretrain must be >= 0, got -1"),
    bad_override("epochs.sparsify=true", r"epochs.sparsify must be an integer, got True"),
    bad_override("optim.lr=-1", r"OptimConfig.lr must be > 0, got -1.0"),
    bad_override("optim.lr=0", r"OptimConfig.lr must be > 0, got 0.0"),
    bad_override("optim.lr=nan", r"optim.lr must be finite, got nan"),
    bad_override("optim.gate_lr=inf", r"optim.gate_lr must be finite, got inf"),
    bad_override("optim.lr=fast", r"optim.lr must be a number, got 'fast'"),
    bad_override("optim.batch_size=0", r"OptimConfig.batch_size must be > 0, got 0"),
    bad_override("optim.gamma=0", r"OptimConfig.gamma must be > 0, got 0.0"),
    bad_override("optim.weight_decay=-1", r"OptimConfig.weight_decay must be >= 0"),
    bad_override("optim.milestones=[0.8,0.5]", r"milestones must be increasing fractions"),
    bad_override("optim.milestones=[1.5]", r"milestones must be increasing fractions in \(0, 1\)"),
    bad_override("optim.milestones=0.5", r"optim.milestones must be a list of numbers, got 0.5"),
    bad_override("optim.decay_gates=yes", r"optim.decay_gates must be true or false"),
    bad_override("gate.alpha=0", r"gate.alpha must be a finite number > 0, got 0.0 \(method 'bb"),
    bad_override("gate.temperature=-1", r"gate.temperature must be a finite number > 0"),
    bad_override("gate.threshold=1.5", r"gate.threshold must be a finite number in \(0, 1\), got "
                 r"1.5 \(method 'bb'\)"),
    Row("override svd's threshold out of its range", r"gate.threshold \(a log alpha\) must be a "
        r"finite number in \(-8, 8\], got 9.0 \(method 'svd'\)",
        argv=lambda e: e.run_argv("gate.method=svd", "gate.threshold=9")),
    bad_override("gate.init_a=0", r"gate.init_a must be a finite number > 0"),
    bad_override("gate.kl_scale=-1", r"GateConfig.kl_scale must be >= 0"),
    bad_override("gate.conv_kl_scale=-2", r"GateConfig.conv_kl_scale must be >= 0"),
    bad_override("gate.dbb_kl_scale=-1", r"GateConfig.dbb_kl_scale must be >= 0"),
    bad_override("gate.method=nonesuch", r"gate.method: unknown gate 'nonesuch'; available: bb"),
    bad_override("gate.settings.droprate_init=0.3", r"gate.droprate_init is not a setting of "
                 r"method 'bb'; its settings: kl_scale, alpha, temperature, threshold"),
    bad_override("gate.droprate_init=0.3", r"gate.droprate_init is not a setting of method 'bb'"),
    bad_override("gate.settings.x=[1,2]", r"gate.settings.x must be float or int or bool or "
                 r"str, got \[1, 2\]"),
    bad_override("gate.settings=3", r"gate.settings must be a table of settings, got 3"),
    bad_override("gate.settings.alpha=0", r"gate.alpha must be a finite number > 0, got 0"),
    bad_override("gate.method=dbb", r'gate.method = "dbb" with epochs.dbb > 0 would train DBB'),
    bad_override("device=tpu", r"RunConfig.device must be auto, cpu or cuda\[:N\], got 'tpu'"),
    bad_override("seed=-1", r"RunConfig.seed must be in \[0, 2\*\*63 - 1\], got -1"),
    bad_override(f"seed={2**64}", r"RunConfig.seed must be in \[0, 2\*\*63 - 1\]"),
    bad_override("seed=one", r"seed must be an integer, got 'one'"),
    bad_override("threads=-1", r"RunConfig.threads must be >= 0 \(0: choose\), got -1"),
    bad_override("compile=maybe", r"compile must be true or false, got 'maybe'"),
    bad_override("threads=100000", rf"threads=100000 is more than the {CORES} cores this "
                 r"process may use; give at most that many, or 0 to choose"),
    bad_override("device=cuda:x", r"RunConfig.device must be auto, cpu or cuda\[:N\], got "
                 r"'cuda:x'"),
    bad_override("data.data_dir=", r"DataConfig.data_dir is empty; give a folder, or leave it "
                 r"out"),
    bad_config_file("a name of spaces", 'name = "   "\n', r"RunConfig.name names the run's "
                    r"folder: 1 to 100 printable characters, not only spaces"),
    bad_config_file("a name of 300 characters", f'name = "{"x" * 300}"\n',
                    r"RunConfig.name names the run's folder: 1 to 100"),
    bad_config_file("a name with a control character", 'name = "a\\tb"\n',
                    r"RunConfig.name names the run's folder: 1 to 100 printable"),
    bad_override("name=a/b", r"RunConfig.name names the run's folder: .*got 'a/b'"),
    bad_override("model.name=resnet", r"unknown model 'resnet'"),
    bad_override("data.name=imagenet", r"unknown dataset 'imagenet'; available:"),
    bad_override("data.validation=-1", r"DataConfig.validation must be >= 0, got -1"),
    bad_override("data.validation=200", r"data.validation=200: must be an int that leaves "
                 r"training examples; the training set of 'fashion-mnist' has 200"),
    bad_override("data.limit_train=-5", r"DataConfig.limit_train must be >= 0, got -5"),
    bad_override("data.limit_train=1000", r"data.limit_train=1000 exceeds the 200 training "
                 r"examples of 'fashion-mnist'; use at most that many, or 0 for all"),
    Row("every epoch 0", r"every stage has 0 epochs: nothing to run",
        argv=lambda e: e.run_argv("epochs.pretrain=0", "epochs.sparsify=0", "epochs.dbb=0")),
    bad_override("epochs.sparsify=0", r"epochs.dbb > 0 needs the sparsification stage"),
    Row("--stage unknown", r"unknown stage 'bbb'; stages of 'lenet-500-300-fashion-cpu'",
        argv=lambda e: ["train", SHIPPED, "--stage", "bbb", *TINY, *e.data_args(),
                        "--out", str(e.out)]),
    Row("--stage before its previous stage", r"stage 'bb' starts from the 'pretrain' "
        r"checkpoint, and .*out has none; run that stage first \(bbdrop train --stage pretrain",
        argv=lambda e: ["train", SHIPPED, "--stage", "bb", *TINY, *e.data_args(),
                        "--out", str(e.out), "--quiet"]),
    # the model against the data, before training
    Row("digits into LeNet-500-300", r"model 'lenet_500_300' and dataset 'digits' \(inputs "
        r"\(1, 8, 8\)\) do not fit: .*; choose a model made for these inputs",
        argv=lambda e: ["run", SHIPPED, *TINY, "data.name=digits", "--out", str(e.out)]),
    Row("Fashion-MNIST into VGG", r"model 'vgg_like' and dataset 'fashion-mnist' .* do not "
        r"fit: .*3 channels", argv=lambda e: e.run_argv("model.name=vgg_like")),
    Row("digits into LeNet5", r"model 'lenet5_caffe' and dataset 'digits' .* do not fit",
        argv=lambda e: ["run", SHIPPED, *TINY, "model.name=lenet5_caffe", "data.name=digits",
                        "--out", str(e.out)]),
    # data files
    Row("dataset missing offline", r"dataset 'fashion-mnist': no folder .*empty/fashion-mnist, "
        r"and download=False; create it with the files below, or allow downloads",
        setup=lambda e: (e.tmp / "empty").mkdir(),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'empty'}")),
    Row("data_dir is a file", r"data_dir .*datafile is not a folder; give the folder that "
        r"holds \(or will hold\) fashion-mnist/, not a file",
        setup=lambda e: write(e.tmp / "datafile", "x"),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'datafile'}")),
    Row("data_dir holds 3 of the 4 files", r"d3/fashion-mnist lacks t10k-labels-idx1-ubyte.gz, "
        r"and download=False; place them there",
        setup=lambda e: (tiny_data(e.tmp / "d3") / "fashion-mnist" / idx_file(3)).unlink(),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'd3'}")),
    Row("data_dir/fashion-mnist is a file", r"df/fashion-mnist \(data_dir argument\) is not a "
        r"folder; remove or rename it", setup=lambda e: write(e.tmp / "df" / "fashion-mnist", "x"),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'df'}")),
    Row("$BBDROP_DATA is a file", r"\$BBDROP_DATA .*envfile is not a folder; point "
        r"\$BBDROP_DATA at a folder, or unset it",
        setup=lambda e: (write(e.tmp / "envfile", "x"),
                         e.mp.setenv("BBDROP_DATA", str(e.tmp / "envfile"))),
        argv=lambda e: ["run", SHIPPED, *TINY, "data.download=false", "--out", str(e.out)]),
    Row("empty test split", r"d0/fashion-mnist: the test split has 0 examples; replace the "
        r"files",
        setup=lambda e: tiny_data(e.tmp / "d0", n_test=0),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'd0'}")),
    Row("empty training split", r"d0/fashion-mnist: the train split has 0 examples",
        setup=lambda e: tiny_data(e.tmp / "d0", n_train=0),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'd0'}")),
    Row("8x8 images in the 28x28 files", r"train images are torch.uint8 \(200, 1, 8, 8\), "
        r"expected uint8 \(N, 1, 28, 28\)", setup=lambda e: tiny_data(e.tmp / "d8", side=8),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'd8'}")),
    Row("fewer labels than images", r"t10k-labels-idx1-ubyte.*: 10 labels for the 50 images",
        setup=lambda e: (tiny_data(e.tmp / "dl"), smallfiles.datafiles.write_idx(
            e.tmp / "dl" / "fashion-mnist" / idx_file(3), np.zeros(10, np.uint8), gz=True)),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'dl'}")),
    Row("label outside the classes", r"label 12 outside \[0, 9\]",
        setup=lambda e: (tiny_data(e.tmp / "dl"), smallfiles.datafiles.write_idx(
            e.tmp / "dl" / "fashion-mnist" / idx_file(3), np.full(50, 12, np.uint8), gz=True)),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'dl'}")),
    Row("truncated gzip", r"dt/fashion-mnist/train-images-idx3-ubyte.gz: corrupt gzip stream",
        setup=lambda e: truncate(tiny_data(e.tmp / "dt") / "fashion-mnist" / idx_file(0)),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'dt'}")),
    Row("not gzip at all", r"dg/fashion-mnist/train-labels-idx1-ubyte.gz: bad IDX magic "
        r"number '706c6169'",
        setup=lambda e: write(tiny_data(e.tmp / "dg") / "fashion-mnist" / idx_file(1),
                              b"plain text, not gzip"),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'dg'}")),
    Row("IDX with a wrong magic", r"dm/fashion-mnist/t10k-images-idx3-ubyte.gz: bad IDX magic "
        r"number '01020803'",
        setup=lambda e: write(tiny_data(e.tmp / "dm") / "fashion-mnist" / idx_file(2),
                              gzip.compress(b"\x01\x02\x08\x03" + bytes(12))),
        argv=lambda e: e.run_argv(f"data.data_dir={e.tmp / 'dm'}")),
    Row("files that are not the published ones", r"train-images-idx3-ubyte.gz: not the "
        r"published train-images-idx3-ubyte.gz: SHA-256 .*; delete it",
        argv=lambda e: e.run_argv("data.verify=true")),
    Row("a mirror serving other bytes", r"could not download train-images-idx3-ubyte.gz into "
        r".*root/mnist: the mirrors served wrong bytes .* and nothing was kept", exc=ChecksumError,
        call=lambda e: download_from(e, {k: b"x" + v for k, v in mnist_blobs().items()})),
    Row("a mirror cutting the file short", r"could not download train-images-idx3-ubyte.gz "
        r"into .*: the connection broke off \(below\); check the network",
        exc=DatasetNotFoundError, call=lambda e: download_from(
            e, mnist_blobs(), lengths={"/train-images-idx3-ubyte.gz": 10**6})),
    Row("a mirror without the files (404)", r"could not download train-images-idx3-ubyte.gz "
        r"into .*: the mirror answered HTTP 404",
        exc=DatasetNotFoundError, call=lambda e: download_from(e, {})),
    Row("an unreachable mirror", r"could not download train-images-idx3-ubyte.gz into .*: no "
        r"mirror could be reached", exc=DatasetNotFoundError,
        call=lambda e: download_from(
            e, {}, mirror=f"http://127.0.0.1:{smallfiles.datafiles.closed_port()}/")),
    # the output folder and what an earlier run left in it
    Row("--out is a file", r"output .*afile is a file, not a folder; choose another --out",
        setup=lambda e: write(e.tmp / "afile", "x"),
        argv=lambda e: e.run_argv(out=e.tmp / "afile")),
    Row("--out under a file", r"output .*afile/run is under .*afile, a file, not a folder",
        setup=lambda e: write(e.tmp / "afile", "x"),
        argv=lambda e: e.run_argv(out=e.tmp / "afile" / "run")),
    Row("another configuration in --out", r"holds a run with another configuration "
        r"\(.*config.toml: optim.lr differ\); use another output directory",
        argv=lambda e: e.run_argv("optim.lr=0.5", out=e.run)),
    Row("recorded config.toml broken", r"config.toml: not valid TOML",
        setup=lambda e: write(e.run / "config.toml", "seed = ["),
        argv=lambda e: e.run_argv(out=e.run)),
    Row("a checkpoint without its result", r"bb.pt is not a finished stage's checkpoint "
        r"\(its result lacks .*\); delete it to run its stage again",
        setup=lambda e: edit_checkpoint(e.run / "bb.pt", result="x"),
        argv=lambda e: e.run_argv(out=e.run)),
    Row("a checkpoint holding NaN weights", r"pretrain.pt holds NaN or inf values \(fc1.weight\)"
        r".*; delete it to run its stage again",
        setup=lambda e: edit_checkpoint(e.run / "pretrain.pt", nan="fc1.weight"),
        argv=lambda e: e.run_argv(out=e.run)),
    Row("another process in the same folder", r"another bbdrop process is running in .*out; "
        r"wait for it to finish, or use another output folder", exc=ValueError,
        setup=lambda e: (e.out.mkdir(), (e.out / ".lock").touch()),
        call=lambda e: run_while_locked(e)),
    Row("truncated final checkpoint", r"pretrain.pt is truncated or corrupt \(.*\); delete "
        r".*pretrain.pt to run its stage again",
        setup=lambda e: truncate(e.run / "pretrain.pt"), argv=lambda e: e.run_argv(out=e.run)),
    Row("0-byte final checkpoint", r"bb.pt is empty \(0 bytes\); delete .*bb.pt to run",
        setup=lambda e: write(e.run / "bb.pt", b""), argv=lambda e: e.run_argv(out=e.run)),
    Row("final checkpoint is a folder", r"dbb.pt is not a file; delete it",
        setup=lambda e: ((e.run / "dbb.pt").unlink(), (e.run / "dbb.pt").mkdir()),
        argv=lambda e: e.run_argv(out=e.run)),
    Row("another network's weights", r"pretrain.pt holds the weights of another network "
        r"\((size mismatch|Missing key|Unexpected key).*\); delete it",
        setup=other_network_checkpoint, argv=lambda e: e.run_argv(out=e.run)),
    Row("planted pickle in a checkpoint", r"bb.pt is corrupt or was not written by bbdrop "
        r"\(a weights-only load refused it: .*; nothing in it ran\)",
        setup=lambda e: plant_pickle(e, "bb.pt"), argv=lambda e: e.run_argv(out=e.run),
        after=lambda e: not_exists(e.tmp / "pwned")),
    Row("a torch file that is not ours", r"preprune.pt is not a bbdrop checkpoint; delete",
        setup=lambda e: torch.save({"weights": torch.ones(2)}, e.run / "preprune.pt"),
        argv=lambda e: e.run_argv(out=e.run)),
    Row("truncated in-progress checkpoint", r"bb.last.pt is truncated or corrupt",
        setup=lambda e: (half_run(e), truncate(e.run / "bb.last.pt")),
        argv=lambda e: e.run_argv(out=e.run)),
    Row("in-progress checkpoint of other epochs", r"bb.last.pt holds stage 'bb' of 3 epochs, "
        r"not 'bb' of 1; delete it to start the stage afresh",
        setup=half_run, argv=lambda e: e.run_argv(out=e.run)),
    # faults met while training: stop loudly, keep the last good state, write no row
    Row("learning rates of 1e6", r"stage 'pretrain' diverged in epoch 1: .*Lower the rates",
        argv=lambda e: e.run_argv("optim.lr=1e6", "optim.gate_lr=1e6"), exc=DivergenceError,
        writes=True, after=no_result_row("pretrain")),
    Row("NaN in the training data", r"stage 'pretrain' diverged in epoch 1: the training loss "
        r"is nan", call=lambda e: run_pipeline(CFG, e.out, synthetic(nan=True)),
        exc=DivergenceError, writes=True, after=no_result_row("pretrain")),
    # the Python API
    Row("attach_gates_ to a net without layers", r"no layer to gate: Sequential has no "
        r"nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d", exc=ValueError,
        call=lambda e: bbdrop.attach_gates_(nn.Sequential(nn.ReLU()))),
    Row("attach_gates_ with a filter matching nothing", r"that filter_fn accepts",
        exc=ValueError, call=lambda e: bbdrop.attach_gates_(mlp(), filter_fn=lambda n, m: False)),
    Row("attach_gates_ of an unknown gate", r"unknown gate 'nope'", exc=ValueError,
        call=lambda e: bbdrop.attach_gates_(mlp(), "nope")),
    Row("attach_gates_ twice", r"is already gated; attach gates once", exc=ValueError,
        call=lambda e: bbdrop.attach_gates_(bbdrop.attach_gates_(mlp()))),
    Row("convert_gates_ twice", r"the gate of '1' is a 'dbb' gate already; convert_gates_ "
        r"would re-initialise what it learned", exc=ValueError,
        call=lambda e: bbdrop.convert_gates_(
            bbdrop.convert_gates_(bbdrop.attach_gates_(mlp()), "dbb"), "dbb")),
    Row("int64 input to a BB gate", r"expects floating-point input, got torch.int64; convert",
        exc=ValueError, call=lambda e: create_gate("bb", 3)(torch.ones(2, 3, dtype=torch.long))),
    Row("int64 input to a DBB gate", r"expects floating-point input, got torch.int64",
        exc=ValueError, call=lambda e: create_gate("dbb", 3)(torch.ones(2, 3, dtype=torch.long))),
    Row("input of the wrong width", r"has 3 units but the input has 5 along dimension 1",
        exc=ValueError, call=lambda e: create_gate("bb", 3)(torch.ones(2, 5))),
    Row("input of rank 1", r"expects a batch of inputs, \(N, K, ...\), got rank 1",
        exc=ValueError, call=lambda e: create_gate("bb", 3)(torch.ones(3))),
    Row("unknown model", r"unknown model 'resnet'", exc=ValueError,
        call=lambda e: bbdrop.create_model("resnet")),
    Row("load_dataset with a number for a folder", r"data_dir must be a path \(str or "
        r"os.PathLike\), got 5", exc=TypeError, call=lambda e: load_dataset("digits", 5)),
    Row("unknown dataset", r"unknown dataset 'imagenet'; available:", exc=ValueError,
        call=lambda e: load_dataset("imagenet")),
    Row("hold_out of everything", r"data.validation=120: must be an int that leaves",
        exc=ValueError, call=lambda e: synthetic().hold_out(120)),
    Row("from_tensors with an empty split", r"dataset 'tensors': test split has 0 examples; "
        r"give at least one", exc=ValueError,
        call=lambda e: Dataset.from_tensors(torch.rand(4, 3), torch.zeros(4, dtype=torch.long),
                                            torch.rand(0, 3), torch.zeros(0, dtype=torch.long),
                                            2)),
    Row("train_stage of 0 epochs", r"epochs must be an int >= 1, got 0", exc=ValueError,
        call=lambda e: train_stage(mlp(), [], stage="x", epochs=0, num_train=1,
                                   optim=CFG.optim, evaluate_on=EVAL)),
    Row("train_stage on no examples", r"num_train .* must be >= 1, got 0: the training set is "
        r"empty", exc=ValueError,
        call=lambda e: train_stage(mlp(), [], stage="x", epochs=1, num_train=0,
                                   optim=CFG.optim, evaluate_on=EVAL)),
    Row("load_checkpoint of nothing", r"no checkpoint at '.*none.pt'", exc=CheckpointError,
        call=lambda e: load_checkpoint(e.tmp / "none.pt")),
    Row("DemoConfig with a negative seed", r"seed must be in \[0, 2\*\*63 - 1\], got -1",
        exc=ValueError, call=lambda e: DemoConfig(seed=-1)),
    Row("DemoConfig with 0 threads", r"threads must be an int >= 1, got 0", exc=ValueError,
        call=lambda e: DemoConfig(threads=0)),
    Row("reproduce with seeds as a string", r"seeds must be a list of integers, got '12'",
        exc=ValueError, call=lambda e: reproduce(SHIPPED, "12", e.out)),
    Row("reproduce whose worker dies", r"a worker process died \(killed, or out of memory\) "
        r"while seeds 1, 2 were unfinished; .*run the same command again", exc=ChildProcessError,
        call=lambda e: reproduce(SHIPPED, [1, 2], e.out, TINY, data=DiesWhenUnpickled(),
                                 jobs=2, figures=False)),
    Row("attach_gates_ to a string", r"model must be a torch.nn.Module, got str",
        exc=TypeError, call=lambda e: bbdrop.attach_gates_("net")),
    Row("attach_gates_ with a negative conv_kl_scale", r"conv_kl_scale must be >= 0, got -3",
        exc=ValueError, call=lambda e: bbdrop.attach_gates_(mlp(), conv_kl_scale=-3)),
    Row("float64 input to a float32 gate", r"has torch.float32 parameters but the input is "
        r"torch.float64; convert one to the other", exc=ValueError,
        call=lambda e: create_gate("bb", 3)(torch.ones(2, 3, dtype=torch.float64))),
    Row("evaluate on no examples", r"nothing to evaluate on: the evaluation set has 0 examples",
        exc=ValueError, call=lambda e: evaluate(mlp(), torch.rand(0, 4), torch.zeros(0))),
    Row("train_stage with an empty batch", r"batch 1 of epoch 1 has 0 examples",
        exc=ValueError, call=lambda e: train_stage(
            mlp(), [(torch.rand(0, 4), torch.zeros(0, dtype=torch.long))], stage="x", epochs=1,
            num_train=5, optim=CFG.optim, evaluate_on=EVAL)),
    Row("train_stage with num_train as text", r"num_train must be an int, got '10'",
        exc=TypeError, call=lambda e: train_stage(mlp(), [], stage="x", epochs=1,
                                                  num_train="10", optim=CFG.optim,
                                                  evaluate_on=EVAL)),
    Row("train_stage without an optimiser config", r"optim must be a "
        r"bbdrop.config.OptimConfig, got NoneType", exc=TypeError,
        call=lambda e: train_stage(mlp(), [], stage="x", epochs=1, num_train=5, optim=None,
                                   evaluate_on=EVAL)),
    Row("run_pipeline with a dict", r"cfg must be a bbdrop.config.RunConfig .*got dict",
        exc=TypeError, call=lambda e: run_pipeline({"seed": 1}, e.out)),
    Row("run_pipeline without a folder", r"out_dir must name a folder, got None",
        exc=ValueError, call=lambda e: run_pipeline(CFG, None)),
    Row("RunConfig with a text seed", r"RunConfig.seed must be an integer, got '1'",
        exc=ValueError, call=lambda e: RunConfig(seed="1")),
    Row("RunConfig with 2.5 threads", r"RunConfig.threads must be an integer, got 2.5",
        exc=ValueError, call=lambda e: RunConfig(threads=2.5)),
    Row("sweep with seeds as a string", r"seeds must be a list of integers, got '12'",
        exc=ValueError, call=lambda e: sweep(SHIPPED, "bb", [1.0], "12", e.out)),
    Row("reproduce with no seeds", r"give at least one seed", exc=ValueError,
        call=lambda e: reproduce(SHIPPED, [], e.out)),
    Row("reproduce with jobs 0", r"jobs must be an int >= 1, got 0", exc=ValueError,
        call=lambda e: reproduce(SHIPPED, [1], e.out, jobs=0)),
]  # fmt: skip


# -- helpers for the rows of the commands that read or write others' files ---------------
DOCS = Path(__file__).parents[1] / "docs"


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """Rewrite the JSON file ``path`` with ``edit(value)`` (its return value when not None),
    NaN allowed, as a hand edit could leave it."""
    value = json.loads(path.read_text())
    changed = edit(value)
    path.write_text(json.dumps(value if changed is None else changed, allow_nan=True))


def put(value: dict[str, Any], dotted: str, new: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        value = value[key]
    if new is _DELETE:
        del value[last]
    else:
        value[last] = new


_DELETE = object()


def reproduce_folder(env: Env, seeds: Sequence[int] = (1, 2)) -> Path:
    """``tmp/rep``: a reproduce folder of the tiny run's results.json, one per seed."""
    for seed in seeds:
        record = json.loads((env.run / "results.json").read_text())
        record["config"]["seed"] = seed
        write(env.tmp / "rep" / f"seed-{seed}" / "results.json", json.dumps(record))
    return env.tmp / "rep"


def result_edited(dotted: str, new: Any) -> Callable[[Env], None]:
    """A reproduce folder whose seed 2 has ``dotted`` set to ``new``."""

    def setup(env: Env) -> None:
        path = reproduce_folder(env) / "seed-2" / "results.json"
        edit_json(path, lambda r: put(r, dotted, new))

    return setup


def bad_table(id_: str, setup: Callable[[Env], Any], error: str) -> Row:
    return Row(f"table: {id_}", error, setup=setup, argv=lambda e: ["table", str(e.tmp / "rep")])


def sweeps_folder(env: Env, edit: Callable[[Any], Any] | None = None, method: str = "bb") -> Path:
    """``tmp/sw``: a copy of LeNet-500-300's sweep records, ``method``'s edited."""
    shutil.copytree(DOCS / "sweeps" / SHIPPED, env.tmp / "sw")
    if edit is not None:
        edit_json(env.tmp / "sw" / method / "sweep.json", edit)
    return env.tmp / "sw"


def bad_front(id_: str, edit: Callable[[Any], Any], error: str) -> Row:
    return Row(f"front: {id_}", error, setup=lambda e: sweeps_folder(e, edit),
               argv=lambda e: ["front", str(e.tmp / "sw")])  # fmt: skip


def mixed_seeds(env: Env) -> None:
    """Seed 1 of LeNet-500-300 beside seeds 2 and 3 of LeNet5-Caffe."""
    reproduce_folder(env, (1,))
    for seed in (2, 3):
        source = DOCS / "runs" / "lenet5-caffe-fashion-cpu" / "bb" / f"seed-{seed}"
        shutil.copytree(source, env.tmp / "rep" / f"seed-{seed}")


def no_compiler(env: Env) -> None:
    import torch._inductor.config

    env.mp.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/g++",))


def compact_argv(*extra: str) -> Callable[[Env], list[str]]:
    return lambda e: ["compact", str(e.run), *(x.format(run=e.run, tmp=e.tmp) for x in extra)]


def bad_compact(id_: str, error: str, *extra: str, setup: Callable[[Env], Any] | None = None
                ) -> Row:  # fmt: skip
    return Row(f"compact: {id_}", error, argv=compact_argv(*extra), setup=setup)


def sweep_argv(env: Env, *extra: str) -> list[str]:
    return ["sweep", SHIPPED, "--method", "bb", "--validation", "50", "--scales", "1,3", *TINY,
            *env.data_args(), "--out", str(env.out), "--quiet", *extra]  # fmt: skip


def junk_sweep_record(env: Env) -> None:
    write(env.out / SHIPPED / "sweep" / "sbp" / "sweep.json", '{"foo": 1}')


NOT_COMPACT = "compact file"
HOSTILE_ROWS: list[Row] = [
    # bbdrop compact: no output replaces a file that is not one of its kind
    bad_compact("--onnx onto the trained checkpoint", r"bb.pt.*\.onnx", "--onnx", "{run}/bb.pt"),
    bad_compact("--onnx onto the config", r"config.toml.*\.onnx", "--onnx", "{run}/config.toml"),
    bad_compact("--onnx onto results.json", r"results.json.*\.onnx",
                "--onnx", "{run}/results.json"),
    bad_compact("--out onto the trained checkpoint", r"dbb.pt.*\.safetensors",
                "--out", "{run}/dbb.pt"),
    bad_compact("--out equal to --onnx", r"--out and --onnx are the same file",
                "--out", "{tmp}/x.safetensors", "--onnx", "{tmp}/x.safetensors"),
    bad_compact("--onnx a folder", r"dir.onnx.* folder", "--onnx", "{tmp}/dir.onnx",
                setup=lambda e: (e.tmp / "dir.onnx").mkdir()),
    bad_compact("--onnx under /proc", r"/proc", "--onnx", "/proc/bbdrop-net.onnx"),
    bad_compact("--onnx without the export extra", r"onnxscript is missing; install bbdrop's "
                r"export extra", "--onnx", "{tmp}/net.onnx",
                setup=lambda e: e.mp.setitem(sys.modules, "onnxscript", None)),
    bad_compact("--out a folder", r"x.safetensors.* folder", "--out", "{tmp}/x.safetensors",
                setup=lambda e: (e.tmp / "x.safetensors").mkdir()),
    bad_compact("--out onto a file that is not a compact file", r"notes.safetensors exists and "
                r"is not a bbdrop compact file", "--out", "{tmp}/notes.safetensors",
                setup=lambda e: write(e.tmp / "notes.safetensors", "my notes")),
    bad_compact("--onnx onto a file that is not ONNX", r"notes.onnx exists and is not an ONNX",
                "--onnx", "{tmp}/notes.onnx", setup=lambda e: write(e.tmp / "notes.onnx", "x")),
    bad_compact("--out under a file", r"afile", "--out", "{tmp}/afile/x.safetensors",
                setup=lambda e: write(e.tmp / "afile", "x")),
    bad_compact("--round-to 0", r"round_to must be a whole number of units, 1 or more",
                "--round-to", "0"),
    bad_compact("of a stage not finished", r"stage 'sbp'|unknown stage 'sbp'", "--stage", "sbp"),
    Row("compact: of a folder that is no run", r"is not a run directory \(no config.toml\)",
        argv=lambda e: ["compact", str(e.tmp)]),
    # bbdrop run --compile without a compiler: refused before config.toml is written
    Row("run --compile without a C++ compiler", r"torch.compile needs a C\+\+ compiler .* or "
        r"run without --compile", setup=no_compiler, argv=lambda e: e.run_argv("--compile")),
    # bbdrop table: one experiment, every figure a finite number, regular files only
    bad_table("a record of another kind", lambda e: (reproduce_folder(e), write(
        e.tmp / "rep" / "seed-2" / "results.json", '{"foo": 1}')),
        r"seed-2/results.json: field 'stages' must be a table"),
    bad_table("a list", lambda e: (reproduce_folder(e), write(
        e.tmp / "rep" / "seed-2" / "results.json", "[1, 2]")),
        r"seed-2/results.json: field '\(the whole file\)' must be a table"),
    bad_table("an empty file", lambda e: (reproduce_folder(e), write(
        e.tmp / "rep" / "seed-2" / "results.json", "")),
        r"seed-2/results.json: not a JSON record written by bbdrop \(Expecting value"),
    bad_table("an error of null", result_edited("stages.bb.error", None),
              r"seed-2/results.json: field 'stages.bb.error' must be a finite number, got None"),
    bad_table("an error of true", result_edited("stages.dbb.error", True),
              r"field 'stages.dbb.error' must be a finite number, got True"),
    bad_table("an error of NaN", result_edited("stages.bb.error", float("nan")),
              r"seed-2/results.json: not a JSON record written by bbdrop \(holds NaN"),
    bad_table("an infinite speedup", result_edited("stages.bb.speedup", 1e999),
              r"seed-2/results.json: not a JSON record .*Infinity"),
    bad_table("a speedup of 10**400", result_edited("stages.bb.speedup", 10**400),
              r"field 'stages.bb.speedup' must be a finite number, got 1000000"),
    bad_table("no active units", result_edited("stages.bb.active", _DELETE),
              r"field 'stages.bb.active' must be a table \(JSON object\), got None"),
    bad_table("a mix behind a dense record without configuration", lambda e: (
        mixed_seeds(e), reproduce_folder(e, (4,)), edit_json(
            e.tmp / "rep" / "seed-1" / "results.json",
            lambda r: {"stages": {"pretrain": r["stages"]["pretrain"]}})),
        r"rep mixes experiments: .*seed-2/results.json and .*seed-4/results.json"),
    Row("front: a units figure's name taken by a folder", r"units.png exists and is not a "
        r"regular file", setup=lambda e: (sweeps_folder(e), (e.tmp / "sw" / "units.png").mkdir()),
        argv=lambda e: ["front", str(e.tmp / "sw")]),
    bad_table("a missing speedup", result_edited("stages.bb.speedup", _DELETE),
              r"field 'stages.bb.speedup' must be a finite number, got None"),
    bad_table("units as a list", result_edited("stages.bb.units", [1, 2]),
              r"field 'stages.bb.units' must be a table"),
    bad_table("units of text", result_edited("stages.bb.units.fc1", "many"),
              r"field 'stages.bb.units.fc1' must be a finite number >= 0, got 'many'"),
    bad_table("a null stage", result_edited("stages.bb", None),
              r"field 'stages.bb' must be a table \(JSON object\), got None"),
    bad_table("a text measured speedup", result_edited("stages.bb.compact",
              {"speedup_measured": "fast"}), r"stages.bb.compact.speedup_measured"),
    bad_table("a results.json that is /dev/zero", lambda e: (reproduce_folder(e), (
        e.tmp / "rep" / "seed-2" / "results.json").unlink(), (e.tmp / "rep" / "seed-2" /
        "results.json").symlink_to("/dev/zero")), r"seed-2/results.json is not a regular file"),
    bad_table("a results.json that is a FIFO", lambda e: (reproduce_folder(e), (
        e.tmp / "rep" / "seed-2" / "results.json").unlink(), os.mkfifo(
        e.tmp / "rep" / "seed-2" / "results.json")), r"results.json is not a regular file"),
    bad_table("two experiments in one folder", mixed_seeds,
              r"rep mixes experiments: .*seed-1/results.json and .*seed-2/results.json"),
    bad_table("two experiments without their configurations", lambda e: (
        reproduce_folder(e), edit_json(e.tmp / "rep" / "seed-1" / "results.json",
                                       lambda r: put(r, "config", _DELETE)),
        edit_json(e.tmp / "rep" / "seed-2" / "results.json", lambda r: {"stages": {
            "bb": {**r["stages"]["bb"], "units": {"conv1": 3}}}})),
        r"rep mixes experiments"),
    bad_table("one seed twice", lambda e: (reproduce_folder(e, (1,)), shutil.copytree(
        e.tmp / "rep" / "seed-1", e.tmp / "rep" / "bb" / "seed-1")),
        r"bb/seed-1/results.json and .*rep/seed-1/results.json both hold stage 'bb' of the "
        r"same seed|both hold stage"),
    bad_table("a seed folder of letters", lambda e: (reproduce_folder(e, (1,)), shutil.copytree(
        e.tmp / "rep" / "seed-1", e.tmp / "rep" / "seed-x")),
        r"seed-x: a seed folder is named seed-<integer>"),
    bad_table("a run in another seed's folder", lambda e: (reproduce_folder(e, (1,)),
        shutil.copytree(e.tmp / "rep" / "seed-1", e.tmp / "rep" / "seed-7")),
        r"seed-7/results.json is a run of seed 1 in a folder of seed 7"),
    Row("table: a file, not a folder", r"results.json is not a folder",
        argv=lambda e: ["table", str(e.run / "results.json")]),
    # bbdrop front: records checked, one experiment, --tested of the same experiment
    bad_front("an unrelated sweep.json", lambda r: {"foo": 1},
              r"sw/bb/sweep.json: field 'name' must be a non-empty string"),
    bad_front("a list", lambda r: [1], r"sw/bb/sweep.json: field '\(the whole file\)'"),
    bad_front("an error of text", lambda r: put(r, "points", [{**r["points"][0], "error": "x"}]),
              r"field 'points\[0\].error' must be a finite number, got 'x'"),
    bad_front("a null dense error", lambda r: put(r, "points", [{**r["points"][0],
              "dense_error": None}]), r"field 'points\[0\].dense_error' must be a finite"),
    bad_front("no method", lambda r: put(r, "method", _DELETE),
              r"sw/bb/sweep.json: field 'method' must be a non-empty string, got None"),
    bad_front("a chosen scale not swept", lambda r: put(r, "chosen_scale", 12345),
              r"field 'chosen_scale' must be one of the points' scales \[.*\], got 12345"),
    bad_front("no points", lambda r: put(r, "points", []), r"field 'points' must be a non-empty"),
    bad_front("a seed of text", lambda r: put(r, "points", [{**r["points"][0], "seed": "1"}]),
              r"field 'points\[0\].seed' must be an integer, got '1'"),
    bad_front("another experiment's sweep", lambda r: put(r, "name", "lenet5-caffe-fashion-cpu"),
              r"sw mixes experiments: .*sw/bb/sweep.json is a sweep of "
              r"'lenet5-caffe-fashion-cpu', .*dbb/sweep.json of 'lenet-500-300-fashion-cpu'"),
    bad_front("a method in another's folder", lambda r: put(r, "method", "sbp"),
              r"bb/sweep.json is a sweep of method 'sbp' in the folder of 'bb'"),
    Row("front: --tested of another experiment", r"--tested holds runs of "
        r"'lenet5-caffe-fashion-cpu', the sweeps in .* are of 'lenet-500-300-fashion-cpu'",
        setup=sweeps_folder, argv=lambda e: ["front", str(e.tmp / "sw"), "--tested",
                                             str(DOCS / "runs" / "lenet5-caffe-fashion-cpu")]),
    Row("front: --tested of a mixed folder", r"rep mixes experiments",
        setup=lambda e: (sweeps_folder(e), mixed_seeds(e)),
        argv=lambda e: ["front", str(e.tmp / "sw"), "--tested", str(e.tmp / "rep")]),
    Row("front: --out a file", r"cannot write .*afile/front.png: .*afile is a file",
        setup=lambda e: (sweeps_folder(e), write(e.tmp / "afile", "x")),
        argv=lambda e: ["front", str(e.tmp / "sw"), "--out", str(e.tmp / "afile")]),
    Row("front: --prefix naming a folder", r"argument --prefix: a prefix of file names cannot "
        r"name a folder", argv=lambda e: ["front", str(e.tmp), "--prefix", "../x"]),
    # bbdrop sweep: checks its folder before training, keeps every scale apart
    Row("sweep: a junk sweep.json in its folder", r"sweep/sbp/sweep.json: field 'name' must be "
        r"a non-empty string", setup=junk_sweep_record, argv=sweep_argv),
    Row("sweep: chosen.toml is a folder", r"sweep/bb/chosen.toml exists and is not a regular "
        r"file", setup=lambda e: (e.out / SHIPPED / "sweep" / "bb" / "chosen.toml").mkdir(
            parents=True), argv=sweep_argv),
    Row("reproduce: table.md is a folder", r"table.md exists and is not a regular file",
        setup=lambda e: (e.out / SHIPPED / "table.md").mkdir(parents=True),
        argv=lambda e: ["reproduce", SHIPPED, "--seeds", "1", *TINY, *e.data_args(),
                        "--out", str(e.out), "--quiet"]),
    Row("reproduce: a figure's name taken by a folder", r"example-masks.pdf exists and is not",
        setup=lambda e: (e.out / SHIPPED / "example-masks.pdf").mkdir(parents=True),
        argv=lambda e: ["reproduce", SHIPPED, "--seeds", "1", *TINY, *e.data_args(),
                        "--out", str(e.out), "--quiet"]),
    Row("sweep: scales that repeat", r"scales repeat: 1.0, 1.0; give each scale once",
        argv=lambda e: sweep_argv(e, "--scales", "1,1.0")),
    # the same patterns in the run folder itself
    Row("run: config.toml in --out is a FIFO", r"config.toml is not a regular file \(a FIFO",
        setup=lambda e: ((e.run / "config.toml").unlink(), os.mkfifo(e.run / "config.toml")),
        argv=lambda e: e.run_argv(out=e.run)),
    Row("run: .lock in --out is a folder", r"cannot open the lock file .*\.lock \(Is a "
        r"directory\); remove it if it is not a file",
        setup=lambda e: ((e.run / ".lock").unlink(missing_ok=True), (e.run / ".lock").mkdir()),
        argv=lambda e: e.run_argv(out=e.run)),
    Row("compact: config.toml is a FIFO", r"run is not a run directory \(no config.toml\)",
        setup=lambda e: ((e.run / "config.toml").unlink(), os.mkfifo(e.run / "config.toml")),
        argv=lambda e: ["compact", str(e.run)]),
    # bbdrop run: the header comes after the checks (stdout stays empty: see the test)
    Row("run: the header waits for the checks", r"output .*afile is a file",
        setup=lambda e: write(e.tmp / "afile", "x"),
        argv=lambda e: e.run_argv(out=e.tmp / "afile")),
]  # fmt: skip
ROWS += HOSTILE_ROWS


def edit_checkpoint(path: Path, *, result: Any = None, nan: str | None = None) -> None:
    """Rewrite a checkpoint with its result replaced, or one weight tensor set to NaN."""
    state = load_checkpoint(path)
    if result is not None:
        state["result"] = result
    if nan is not None:
        state["model"][nan] = torch.full_like(state["model"][nan], float("nan"))
    save_checkpoint(state, path)


def run_while_locked(env: Env) -> None:
    """A run into a folder that another process (here: a second open file) holds."""
    from bbdrop.pipeline import _run_lock

    with _run_lock(env.out):
        run_pipeline(CFG, env.out, synthetic())


class DiesWhenUnpickled:
    """Sent to a worker process as its data set, it ends that process on arrival, as the
    out-of-memory killer would."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os._exit, (9,))


def not_exists(path: Path) -> None:
    assert not path.exists(), f"{path} was created: the planted pickle ran"


# -- running a row -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny data root and a finished tiny run of every stage on it."""
    root = tmp_path_factory.mktemp("corpus")
    data = tiny_data(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        env = Env(root, data, root / "run", root / "out", mp)
        _hermetic(mp, root)
        assert main(env.run_argv(out=root / "run")) == 0
    return data, root / "run"


@pytest.fixture(scope="module")
def finished_snapshot(finished_run: tuple[Path, Path]) -> dict[str, tuple[int, int, str]]:
    """:func:`_snapshot` of a row's folder holding only its copy of the finished run."""
    run = finished_run[1]
    return {"run": _snapshot(run.parent)["run"]} | {
        f"run/{k}": v for k, v in _snapshot(run).items()
    }


def _hermetic(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    """Only the folders a row names are searched, and caches stay out of the row's folder."""
    mp.delenv("BBDROP_DATA", raising=False)
    mp.setenv("XDG_CACHE_HOME", str(tmp.parent / f"{tmp.name}-xdg-cache"))
    mp.setenv("BBDROP_SYSTEM_DATA", "")  # no system folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under ``folder``: size, mtime and, for regular files, the SHA-256."""
    out = {}
    for p in folder.rglob("*"):
        st = p.lstat()
        regular = stat.S_ISREG(st.st_mode)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if regular else ""
        out[str(p.relative_to(folder))] = (st.st_size if regular else -1, st.st_mtime_ns, digest)
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_gets_a_one_line_answer_and_writes_nothing(
    row: Row,
    finished_run: tuple[Path, Path],
    finished_snapshot: dict[str, tuple[int, int, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, run = finished_run
    env = Env(tmp_path, data, run, tmp_path / "out", monkeypatch)
    _hermetic(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)  # default output folders would appear here
    if row.setup is not None:
        row.setup(env)
    argv = None if row.argv is None else list(row.argv(env))  # may copy the run: before
    before = _snapshot(tmp_path)
    copied_before = bool(env.copied)
    capsys.readouterr()
    if argv is not None:
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            rc = exit_.code
        stdout, err = capsys.readouterr()
        assert rc == 2, f"exit status {rc}; stderr: {err!r}"
        assert row.writes or stdout == "", f"a refused command printed {stdout!r}"
        assert "Traceback" not in err, err
        message = err.strip().splitlines()[-1] if err.startswith("usage:") else err.strip()
        first = message.splitlines()[0] if message else ""
        assert first.startswith("bbdrop") and "error: " in first, err
    else:
        assert row.call is not None
        with pytest.raises(row.exc) as info:
            row.call(env)
        first = (str(info.value).strip().splitlines() or [""])[0]
    assert re.search(row.error, first), f"{row.error!r} not in {first!r}"
    if env.copied and not copied_before:  # a call that asked for the run copied it: as before
        before |= finished_snapshot
    if row.writes:
        assert row.after is not None
    else:
        after = _snapshot(tmp_path)
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        assert not changed, f"written or changed: {sorted(changed)}"
    if row.after is not None:
        row.after(env)


def test_the_corpus_is_large_and_its_ids_unique() -> None:
    assert len(ROWS) >= 220  # docs/reliability.md and the README promise over 220
    assert len({r.id for r in ROWS}) == len(ROWS)


def test_a_planted_pickle_would_run_if_loaded_without_the_guard(tmp_path: Path) -> None:
    """The planted-pickle row proves something: this payload does run under a full load."""
    torch.save({"x": Planted(tmp_path / "ran")}, tmp_path / "p.pt")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_the_row_helpers_do_what_they_say(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write(path, b"0123456789")
    truncate(path, 0.3)
    assert path.read_bytes() == b"012"


@pytest.mark.slow
def test_a_damaged_results_json_is_rebuilt_from_the_checkpoints(
    finished_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """results.json is derived: every finished stage's figures are in its checkpoint."""
    data, run = finished_run
    _hermetic(monkeypatch, tmp_path)
    expected = json.loads((run / "results.json").read_text())
    for damage in ("truncate", "[1, 2]", '{"stages": {"bogus": {}}}'):
        shutil.copytree(run, tmp_path / damage)
        path = tmp_path / damage / "results.json"
        truncate(path) if damage == "truncate" else path.write_text(damage)
        env = Env(tmp_path, data, run, tmp_path / damage, monkeypatch)
        assert main(env.run_argv()) == 0
        assert json.loads(path.read_text()) == expected


def test_a_config_saved_with_a_byte_order_mark_reads_as_without(tmp_path: Path) -> None:
    from bbdrop.config import load_config

    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbfname = "x"\r\nseed = 3\r\n')  # as Windows Notepad saves it
    assert (load_config(path).name, load_config(path).seed) == ("x", 3)
