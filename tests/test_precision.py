"""Mixed precision (bbdrop.precision): under bf16 autocast the layers compute in bfloat16
and every gate in float32.

Two checks, because they measure different things:

* LeNet5 (every method): one training step's gate gradients under bf16 autocast are
  within 1e-3 (absolute) of float32's, with the same noise. The difference left is the
  bfloat16 arithmetic of the layers, which reaches the gates through the activations
  (worst measured: 6.4e-4, VIB). Not DBB's input-dependent parameters (``scale``,
  ``shift``, ``shift_std_raw``): their gradients move by 20 to 40% (relative norm) when
  only the gates' inputs are rounded to bfloat16, everything else in float32, as much as
  under autocast (measured on this batch and two others). The relaxed Bernoulli's
  gradient with respect to phi's logit is that sensitive to the activations; no
  arithmetic inside the gate could remove it. They are checked to be finite.
* The ResNet of examples/resnet_fashion.py (every method): each gate receives float32
  activations with autocast off, whatever the layer before computed in. BB's and SVD's
  gate gradients stay within 1e-3 of float32's; the other methods' gradients go through
  the activations themselves (:data:`WITHIN_1E_3_ON_THE_RESNET` has the numbers), and bf16
  autocast moves the *ungated* ResNet's weight gradients by 31% (relative norm, this
  batch), through its 17 layers of batch-normalised bfloat16 convolutions.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.gates.base import Gate
from bbdrop.models import lenet5_caffe
from bbdrop.train.loop import _objective

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from resnet_fashion import ResNet

METHODS = ["bb", "dbb", "svd", "ssl", "sbp", "l0", "vib"]
INPUT_DEPENDENT = ("scale", "shift", "shift_std_raw")  # DBB's phi(x) (see above)
# The methods whose gate gradients on the ResNet stay within 1e-3 of float32's under bf16
# (largest differences on this batch: BB 1.3e-5, SVD 2.2e-4). The others' depend on the
# activations themselves: DBB's b_raw 2.7e-3 and phi(x)'s up to 0.49, SBP's mu 9.8e-3,
# L0's log_alpha 4.8e-3, VIB's mu 5.0e-2 (SSL has no parameters).
WITHIN_1E_3_ON_THE_RESNET = ("bb", "svd")


def gated(make: type[nn.Module] | object, method: str, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    net = make()  # type: ignore[operator]
    bbdrop.attach_gates_(net, method, example=x[:8])
    net.train()
    if method == "dbb":
        net(x)  # running statistics of a network that has seen data
    return net


def step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str):
    """One objective and backward pass of a copy of ``net``, with the same noise each time:
    the loss and the gate parameters' gradients."""
    net = copy.deepcopy(net)
    torch.manual_seed(5)
    loss, _, _ = _objective(net, 1000, False, precision)(x, y)
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if ".gate." in n and p.grad is not None}
    return loss, grads


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_step_on_lenet5_gives_the_float32_gate_gradients_within_1e_3(method: str) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    net = gated(lambda: lenet5_caffe(num_classes=10), method, x)
    loss32, grads32 = step(net, x, y, "float32")
    loss16, grads16 = step(net, x, y, "bf16")
    assert torch.isfinite(loss16)
    torch.testing.assert_close(loss16, loss32, rtol=1e-3, atol=0)
    assert grads16.keys() == grads32.keys()
    for name, g in grads32.items():
        assert torch.isfinite(grads16[name]).all(), name
        if method == "dbb" and name.rsplit(".", 1)[1] in INPUT_DEPENDENT:
            continue
        torch.testing.assert_close(grads16[name], g, rtol=0, atol=1e-3, msg=name)
    if method != "ssl":  # SSL's penalty has no parameters of its own
        assert grads32


@pytest.mark.parametrize("method", METHODS)
def test_under_bf16_autocast_every_gate_of_a_resnet_computes_in_float32(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    net = gated(lambda: ResNet(width=4), method, x)
    seen: list[tuple[torch.dtype, bool]] = []

    def record(x: torch.Tensor) -> None:
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))

    compared = method in WITHIN_1E_3_ON_THE_RESNET
    grads32 = step(net, x, y, "float32")[1] if compared else {}
    gates = [m for m in net.modules() if isinstance(m, Gate)]
    checked = Gate.check_tensor  # every gate checks what it computes on, at every use

    def recorded(self: Gate, x: torch.Tensor) -> None:
        record(x)
        checked(self, x)

    monkeypatch.setattr(Gate, "check_tensor", recorded)
    loss, grads = step(net, x, y, "bf16")
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    for name, g in grads32.items():  # BB's and SVD's
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-3, msg=name)
    assert bool(grads32) == compared
    assert len(seen) >= len(gates)  # each gate at least once
    assert set(seen) == {(torch.float32, False)}
    net.eval()  # the test-time gates too
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16  # the layers did compute in bf16
    assert set(seen) == {(torch.float32, False)}


def test_fp16_on_the_cpu_is_refused_with_the_precision_that_works() -> None:
    from bbdrop.precision import check_precision

    with pytest.raises(ValueError, match="on the CPU use precision bf16"):
        check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of float32, bf16, fp16"):
        check_precision("half", "cpu")


def test_a_run_trains_every_stage_in_bf16_and_fp16_on_the_cpu_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import smallfiles

    from bbdrop.cli import main

    monkeypatch.delenv("BBDROP_DATA", raising=False)
    smallfiles.write_idx_dataset(tmp_path / "data", "fashion-mnist", 300, 60)
    argv = ["run", "lenet-500-300-fashion-cpu", "epochs.pretrain=1", "epochs.sparsify=1",
            "epochs.dbb=1", "device=cpu", "optim.batch_size=50", "data.limit_train=200",
            "data.download=false", "data.verify=false", f"data.data_dir={tmp_path / 'data'}",
            "--threads", "1", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "half"), "--precision", "fp16"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "on the CPU use precision bf16" in err[0], err
    assert not (tmp_path / "half").exists()
    assert main([*argv, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    result = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert result["config"]["precision"] == "bf16"
    for stage in ("pretrain", "bb", "dbb"):
        history = result["stages"][stage]["history"]
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history), stage
