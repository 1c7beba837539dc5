"""bbdrop.sparsify: the recipe in one call, on a user's network and data in any of the
three forms; N from the data; two stages for DBB; resume after a kill; a folder of
another call refused; the compacted network equal to the gated one."""

from __future__ import annotations

import copy
import functools
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from forked import forked, needs_fork
from networks import ResNet, fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bbdrop

TESTS = Path(__file__).resolve().parent


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is the sign pattern of two channels' means: learnable."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()


def trained_resnet() -> nn.Module:
    """A small ResNet trained for a few steps on :func:`data` (a copy of one made once)."""
    return copy.deepcopy(_trained_resnet())


@functools.cache
def _trained_resnet() -> nn.Module:
    torch.manual_seed(0)
    net = ResNet(width=4, classes=4)
    return fit(net, *data(256), epochs=3)


def test_param_groups_split_weights_and_gates() -> None:
    net = bbdrop.attach_gates_(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    weights, gates = bbdrop.param_groups(net, lr=0.1, gate_lr=0.2, weight_decay=0.3)
    assert (weights["lr"], weights["weight_decay"], gates["lr"], gates["weight_decay"]) == (
        0.1, 0.3, 0.2, 0.0)  # fmt: skip
    gate_params = {id(p) for n, p in net.named_parameters() if ".gate." in n}
    assert {id(p) for p in gates["params"]} == gate_params
    assert {id(p) for p in weights["params"]}.isdisjoint(gate_params)
    assert len(weights["params"]) + len(gates["params"]) == len(list(net.parameters()))


@pytest.mark.parametrize(
    "form", ["tensors", pytest.param("loader", marks=pytest.mark.slow)],  # a Dataset:
    # sparsify puts it in a DataLoader of its own, the path the loader form takes
)  # fmt: skip
def test_each_form_of_data_gives_the_same_n_and_a_compacted_network(
    form: str, tmp_path: Path
) -> None:
    net = trained_resnet()
    x, y = data(300, seed=1)
    train = {
        "tensors": (x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True),
    }[form]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = bbdrop.sparsify(net, train, val=data(64, seed=2), epochs=1, checkpoint_dir=tmp_path,
                          kl_scale=50.0)  # fmt: skip
    assert json.loads((tmp_path / "sparsify.json").read_text())["num_train"] == 300
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # not changed
    assert list(out.report.history) == ["bb"] and len(out.report.history["bb"]) == 1
    xv, _ = data(64, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(out.compact(xv), out.gated.eval()(xv), rtol=1e-5, atol=1e-5)
    r = out.report
    assert r.error is not None and 0 <= r.error <= 100 and r.dense_error is not None
    assert r.flops <= r.dense_flops and r.parameters <= r.dense_parameters
    assert r.dense_ms > 0 and r.compact_ms > 0
    assert set(r.units) == set(r.widths) and "bb" in str(r)


def test_a_folder_of_another_call_is_refused(tmp_path: Path) -> None:
    settings = {"method": "bb", "epochs": 1, "dbb_epochs": 1, "num_train": 100, "seed": 0,
                "gate": {}}  # fmt: skip
    (tmp_path / "sparsify.json").write_text(json.dumps(settings))
    net, train = ResNet(width=4, classes=4), data(100)
    with pytest.raises(ValueError, match=r"other settings \(method\)"):
        bbdrop.sparsify(net, train, method="vib", epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(num_train\)"):
        bbdrop.sparsify(net, data(99), epochs=1, checkpoint_dir=tmp_path)
    assert not list(bbdrop.gated_layers(net)) and os.listdir(tmp_path) == ["sparsify.json"]


def test_a_folder_sparsify_did_not_write_is_left_alone(tmp_path: Path) -> None:
    """A pipeline's run folder holds bb.pt and bb.last.pt too: sparsify would read them
    as its own stages, then replace them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "bb.pt").write_bytes(b"a trained checkpoint")
    net, train = ResNet(width=4, classes=4), data(100)
    with pytest.raises(ValueError, match="holds files sparsify did not write"):
        bbdrop.sparsify(net, train, epochs=1, checkpoint_dir=run)
    assert os.listdir(run) == ["bb.pt"] and (run / "bb.pt").read_bytes() == b"a trained checkpoint"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        bbdrop.sparsify(net, train, epochs=1, checkpoint_dir=tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x" and not list(bbdrop.gated_layers(net))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "nope"}, ValueError, "unknown gate"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"train": [1, 2, 3]}, TypeError, r"train must be \(x, y\) tensors"),
        ({"train": (torch.zeros(3, 3, 8, 8), torch.zeros(2))}, ValueError, "3 inputs and 2"),
        ({"val": "x"}, TypeError, r"val must be \(x, y\)"),
    ],
)
def test_bad_arguments_get_one_line(kwargs: dict, error: type, message: str) -> None:
    kwargs = {"train": data(20), **kwargs}
    with pytest.raises(error, match=message):
        bbdrop.sparsify(ResNet(width=4, classes=4), **kwargs)


def sparsify_into(folder: str, out: str) -> None:
    """The call the test kills: DBB with a budget on a small MLP (the test is about the
    resume), checkpoints in ``folder``, the gated network's state saved to ``out``."""
    from test_budget import data as flat
    from test_budget import trained

    result = bbdrop.sparsify(trained(), flat(600), method="dbb", epochs=3, dbb_epochs=2,
                             checkpoint_dir=folder, kl_scale=30.0, batch_size=50,
                             budget=0.5)  # fmt: skip
    torch.save(result.gated.state_dict(), out)


def uninterrupted(folder: Path) -> dict[str, torch.Tensor]:
    """The same call, in this process on one thread: the gated network's state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sparsify_into(str(folder), str(folder.parent / "whole.pt"))
    finally:
        torch.set_num_threads(threads)
    return torch.load(folder.parent / "whole.pt")


@pytest.mark.slow
@needs_fork
def test_a_killed_call_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """DBB with a FLOP budget: the kill lands in the BB stage, whose controller (its
    scales, the units it removed) must come back with the checkpoint. The calls run in
    forked processes (tests/forked.py)."""

    def run(folder: str, out: str) -> multiprocessing.Process:
        return forked(sparsify_into, str(tmp_path / folder), str(tmp_path / out),
                      stderr=tmp_path / "stderr")  # fmt: skip

    proc = run("killed", "killed.pt")
    progress = tmp_path / "killed" / "bb.last.pt"
    deadline = time.monotonic() + 200
    while not progress.exists() and proc.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.exitcode is None, "the run ended before its first checkpoint"
    proc.kill()
    proc.join()
    assert not (tmp_path / "killed.pt").exists()
    resume = run("killed", "killed.pt")
    whole = uninterrupted(tmp_path / "whole")  # meanwhile, here: the same call, never killed
    resume.join(300)
    assert resume.exitcode == 0, (tmp_path / "stderr").read_text()
    resumed = torch.load(tmp_path / "killed.pt")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_recalibration_keeps_the_gates_on_the_norms_at_their_test_time_values() -> None:
    """With gates on coupled groups, a gate is the child of the norm it follows: putting
    the norm in training mode must not put its gate there (the statistics would then
    come from noisy training draws, differing from call to call)."""
    from bbdrop.recipe import recalibrate_batch_norms

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
                        nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))  # fmt: skip
    x = torch.randn(300, 6)
    bbdrop.attach_gates_(net, "bb", example=x[:8], init_b=1.0)  # E[pi] well below 1: noisy
    assert isinstance(net[1].gate, bbdrop.Gate)  # on the norm's output, its child
    net.train()
    first, second = (recalibrate_batch_norms(copy.deepcopy(net), x, batch_size=100)
                     for _ in range(2))  # fmt: skip
    for i in (1, 4):
        assert torch.equal(first[i].running_mean, second[i].running_mean)
        assert torch.equal(first[i].running_var, second[i].running_var)
    modes: list[bool] = []
    net[4].register_forward_pre_hook(lambda m, a: modes.append(net[1].gate.training))
    recalibrate_batch_norms(net.train(), x, batch_size=100)
    assert modes and not any(modes) and not net.training


def test_recalibration_gives_the_norms_the_statistics_of_their_test_time_inputs() -> None:
    """Without gates it is torch's own update_bn; with gates, the first norm gets the
    mean of what it receives in evaluation (the gates at their test-time values)."""
    from torch.optim.swa_utils import update_bn

    from bbdrop.recipe import recalibrate_batch_norms

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3),
                        nn.BatchNorm1d(3))  # fmt: skip
    x = torch.randn(300, 6)
    reference = copy.deepcopy(net)
    update_bn(list(x.split(100)), reference)
    plain = recalibrate_batch_norms(copy.deepcopy(net), x, batch_size=100)
    assert not plain.training and plain[1].momentum == 0.1
    for i in (1, 4):
        torch.testing.assert_close(plain[i].running_mean, reference[i].running_mean)
        torch.testing.assert_close(plain[i].running_var, reference[i].running_var)
    bbdrop.attach_gates_(net, "bb")
    seen: list[torch.Tensor] = []
    net[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    net.eval()
    with torch.no_grad():
        net(x)  # evaluation: the gate on the first layer's input at its test values
    recalibrate_batch_norms(net, x, batch_size=100)
    torch.testing.assert_close(net[1].running_mean, seen[0].mean(0), rtol=1e-5, atol=1e-6)
