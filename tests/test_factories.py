"""A network and a data set of the user's own on the command line: ``model.name`` and
``data.name`` as ``module.path:attribute`` (bbdrop.factories; docs/cli.md, "Your own
network and data").

A tiny project is written in the test's folder (``mynets.py``, ``mydata.py``,
``badnets.py``) and bbdrop runs there, as a user would run it in a project folder:
end to end in subprocesses (run, then compact on the finished run, which resolves the
names again from its config.toml), with worker processes (reproduce --jobs 2, then
table), and each broken factory in process, which must get a one-line error with exit
status 2 and write nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bbdrop.cli import main
from bbdrop.config import ConfigError, RunConfig, apply_overrides

BASE = "lenet-500-300-fashion-cpu"  # a shipped experiment; model and data replaced
TINY = ["model.name=mynets:mlp", "data.name=mydata:load", "epochs.pretrain=1",
        "epochs.sparsify=1", "epochs.dbb=0", "device=cpu", "optim.batch_size=50"]  # fmt: skip
MODULES = ("mynets", "mydata", "badnets", "brokennets")
# -P: the working folder is not put on sys.path by Python, as for the `bbdrop` script
PYTHON = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else [])]

PROJECT = {
    "mynets.py": """
        import torch
        from torch import nn


        def mlp(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(),
                                 nn.Linear(16, num_classes))


        class Block(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
                self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

            def forward(self, x):
                return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


        def residual(num_classes):
            return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False),
                                 nn.BatchNorm2d(8), nn.ReLU(), Block(8), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, num_classes))
        """,
    "mydata.py": """
        import torch


        def load():
            # the same data on every call: workers and `bbdrop compact` call it again
            g = torch.Generator().manual_seed(0)
            x = torch.rand(250, 1, 28, 28, generator=g)
            y = torch.arange(250) % 10
            return x[:200], y[:200], x[200:], y[200:]


        def three():
            return load()[:3]


        def arrays():
            return tuple(t.numpy() for t in load())


        def uint8():
            x, y, tx, ty = load()
            return (x * 255).to(torch.uint8), y, tx, ty
        """,
    "badnets.py": """
        from torch import nn

        resnet = 3


        def text(num_classes):
            return "a network"


        def seven(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))


        def no_classes():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


        def fails(num_classes):
            raise RuntimeError("out of memory\\nsecond line")
        """,
    "brokennets.py": """
        import a_package_that_is_not_installed
        """,
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The tiny project in ``tmp_path``, the working folder; its modules imported by a
    test are forgotten after it, and the import path restored."""
    for name, text in PROJECT.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in MODULES:
        sys.modules.pop(name, None)


def bbdrop(folder: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``python -P -m bbdrop ARGV`` in ``folder``."""
    return subprocess.run([*PYTHON, "-m", "bbdrop", *argv], cwd=folder, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


# -- end to end -------------------------------------------------------------------------
@pytest.mark.slow
def test_run_then_compact_on_a_network_and_data_of_ones_own(project: Path) -> None:
    import bbdrop as bd
    from bbdrop.config import load_config
    from bbdrop.factories import load_factory
    from bbdrop.pipeline import load_data, stage_model
    from bbdrop.train.checkpoint import load_checkpoint

    done = bbdrop(project, "run", BASE, *TINY, "--out", "run", "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"bbdrop run {BASE}: mynets:mlp on mydata:load" in done.stdout
    cfg = load_config(project / "run" / "config.toml")  # the names as given, to resolve again
    assert (cfg.model.name, cfg.data.name) == ("mynets:mlp", "mydata:load")
    results = json.loads((project / "run" / "results.json").read_text())
    assert list(results["stages"]) == ["pretrain", "bb"]
    assert results["config"]["model"]["name"] == "mynets:mlp"

    done = bbdrop(project, "compact", "run")
    assert done.returncode == 0, done.stderr
    path = project / "run" / "bb.compact.safetensors"
    assert f"wrote {Path('run') / 'bb.compact.safetensors'}" in done.stdout
    assert "template=mlp(num_classes=10)), mlp from mynets" in done.stdout

    mlp = load_factory("mynets:mlp")  # found in the working folder, as bbdrop found it
    small = bd.load_compact(path, template=mlp(num_classes=10))
    data = load_data(cfg)
    gated = stage_model(cfg, "bb", 10, data.train_x[:8])  # a factory's gates: on groups
    gated.load_state_dict(load_checkpoint(project / "run" / "bb.pt")["model"])
    assert all(layer.gate.group_root is not None for _, layer in bd.gated_layers(gated))
    x = data.test_x
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated.eval()(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_residual_network_of_ones_own_gets_gates_on_its_groups_and_a_budget(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A factory's network gets the group placement (gate.placement = "auto"): a residual
    stream's channels share one gate, the gates start near 1, the batch norms are
    re-estimated after each gated stage, and the figures are counted on the compacted
    graph (the paper's per-layer accounting covers sequential networks only: "-")."""
    import bbdrop as bd
    from bbdrop.config import load_config
    from bbdrop.pipeline import load_data, stage_model
    from bbdrop.recipe import recalibrate_batch_norms
    from bbdrop.train.checkpoint import load_checkpoint

    argv = [*TINY, "model.name=mynets:residual", "epochs.sparsify=2", "epochs.dbb=1",
            "budget.flops=0.5", "--out", "res", "--quiet"]  # fmt: skip
    assert main(["run", BASE, *argv]) == 0
    out = capsys.readouterr().out
    results = json.loads((project / "res" / "results.json").read_text())
    for stage in ("bb", "dbb"):
        r = results["stages"][stage]
        assert r["speedup_authors"] is None and r["memory_authors"] is None
        assert r["speedup"] > 1.5 and 0 < r["memory_params"] < 1
        assert re.search(rf"\| {stage.upper()} \| [^|]+ \| [^|]+ \| [0-9.]+x \| - \|", out)
    assert abs(results["stages"]["dbb"]["budget"]["cost"] - 0.5) <= 0.05 * 0.5
    assert abs(1 / results["stages"]["dbb"]["speedup"] - 0.5) <= 0.05 * 0.5  # recorded alike

    cfg = load_config(project / "res" / "config.toml")
    data = load_data(cfg)
    net = stage_model(cfg, "bb", 10, data.train_x[:8])
    net.load_state_dict(load_checkpoint(project / "res" / "bb.pt")["model"])
    groups = {name: layer.gate.group_root for name, layer in bd.gated_layers(net)}
    assert len(groups) == 2  # the stream (stem + block output, one gate) and the block's inside
    assert sum(len(layer.gate.shared_with) for _, layer in bd.gated_layers(net)) >= 1
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    recalibrate_batch_norms(net, data.train_x[:2000])  # what the run stored: the same again
    for k, v in net.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, stats[k], rtol=1e-5, atol=1e-6)
    assert main(["compact", "res"]) == 0  # compact checks its outputs against the gated one


@pytest.mark.slow
def test_reproduce_in_worker_processes_then_table(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The workers of --jobs import the factories too (the parent runs in this process,
    whose import path lacks the working folder until bbdrop adds it)."""
    assert main(["reproduce", BASE, *TINY, "--seeds", "1,2", "--jobs", "2", "--no-figures",
                 "--out", "runs", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    for seed in (1, 2):
        assert (project / "runs" / BASE / f"seed-{seed}" / "bb.pt").is_file()
    assert main(["table", str(project / "runs" / BASE)]) == 0
    table = capsys.readouterr().out
    assert "2 seed(s)" in table and "| Original |" in table and "| BB |" in table


# -- broken factories: one line, exit status 2, nothing written --------------------------
BROKEN = {
    "module not found": (
        ["model.name=mypkg.nets:resnet18"],
        r"^cannot import 'mypkg\.nets' \(No module named 'mypkg'\): "
        r"model\.name 'mypkg\.nets:resnet18' names a module Python does not "
        r"find; run bbdrop from the folder that holds it",
    ),
    "an import inside the module fails": (
        ["model.name=brokennets:net"],
        r"^cannot import 'brokennets' \(No module named "
        r"'a_package_that_is_not_installed'\): an import in "
        r"its code failed",
    ),
    "no such attribute": (
        ["model.name=mynets:resnet"],
        r"^model\.name 'mynets:resnet': 'mynets' has no attribute 'resnet'",
    ),
    "not a callable": (
        ["model.name=badnets:resnet"],
        r"^'badnets:resnet' is not a callable \(it is an int\)",
    ),
    "returns no module": (
        ["model.name=badnets:text"],
        r"^the factory 'badnets:text' returned a str, not an nn\.Module",
    ),
    "takes no num_classes": (
        ["model.name=badnets:no_classes"],
        r"^the model factory 'badnets:no_classes' must take the keyword "
        r"argument num_classes .*badnets:no_classes\(num_classes=\.\.\.\)",
    ),
    "raises": (
        ["model.name=badnets:fails"],
        r"^the model factory 'badnets:fails' raised RuntimeError: out of memory when "
        r"called as badnets:fails\(num_classes=10\)$",
    ),
    "output does not match the classes": (
        ["model.name=badnets:seven"],
        r"^model 'badnets:seven' and dataset 'mydata:load' "
        r"\(inputs \(1, 28, 28\)\) do not fit: the model "
        r"gives \(7,\) scores per example, the data have 10 "
        r"classes",
    ),
    "data: three tensors": (
        ["data.name=mydata:three"],
        r"^the factory 'mydata:three' returned a tuple of 3, not a bbdrop "
        r"Dataset or a tuple \(train_x, train_y, test_x, test_y\)",
    ),
    "data: arrays": (
        ["data.name=mydata:arrays"],
        r"^the factory 'mydata:arrays' returned a numpy\.ndarray as train_x, not a "
        r"tensor; convert it with torch\.as_tensor",
    ),
    "data: uint8 images": (
        ["data.name=mydata:uint8"],
        r"^dataset 'mydata:uint8': train_x is torch\.uint8; inputs must be "
        r"floating point",
    ),
    "data: data_dir it does not take": (
        ["data.data_dir=elsewhere"],
        r"^the data factory 'mydata:load' must take the keyword "
        r"argument data_dir \(data\.data_dir is set\) or leave "
        r"data\.data_dir unset",
    ),
    "malformed name": (
        ["model.name=mynets:"],
        r"^model\.name 'mynets:' has a ':' but is not module\.path:attribute",
    ),
}


@pytest.mark.parametrize("overrides,error", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_factory_gets_one_line(
    project: Path, overrides: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in project.iterdir())
    rc = main(["run", BASE, *TINY, *overrides, "--out", "out", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", err
    assert err.startswith("bbdrop: error: ") and err.count("\n") == 1, err
    assert re.search(error, err.removeprefix("bbdrop: error: ").strip()), err
    assert sorted(p.name for p in project.iterdir()) == before  # no run folder, no cache


def test_registered_names_and_factories_pass_the_config_check() -> None:
    cfg = apply_overrides(RunConfig(), ["model.name=pkg.sub.nets:Net.build", "data.name=a:b"])
    assert (cfg.model.name, cfg.data.name) == ("pkg.sub.nets:Net.build", "a:b")
    assert apply_overrides(RunConfig(), ["model.name=vgg_like"]).model.name == "vgg_like"
    for bad in ("model.name=:f", "model.name=a-b:f", "data.name=a:b:c", "data.name=1a:f"):
        with pytest.raises(ConfigError, match=r"has a ':' but is not module\.path:attribute"):
            apply_overrides(RunConfig(), [bad])
