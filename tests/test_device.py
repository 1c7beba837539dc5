"""The checks that must hold on every device, marked ``device``: the prepared GPU check
runs them on CUDA (``BBDROP_TEST_DEVICE=cuda pytest -m device``, benchmarks/gpu_check.py).

Each compares the device's arithmetic with the CPU's on the same weights and inputs, or
checks a whole step (training, checkpoint and resume, compaction, export) on the device.
Without ``BBDROP_TEST_DEVICE`` they are skipped: on the CPU they would compare the CPU
with itself, and the rest is what other tests check on every run (test_precision.py,
test_crash_resume.py, test_compact.py, test_export.py). ``BBDROP_TEST_DEVICE=cpu`` runs
them on the CPU (all pass there, 2026-12-07).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.data.batches import BatchIterator
from bbdrop.models import lenet5_caffe
from bbdrop.train.loop import _objective, train_stage

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(
        "BBDROP_TEST_DEVICE" not in os.environ,
        reason="set BBDROP_TEST_DEVICE=cuda (benchmarks/gpu_check.py) or =cpu to run them",
    ),
]
METHODS = ["bb", "dbb", "svd", "ssl", "sbp", "l0", "vib"]


@pytest.fixture(scope="module")
def device() -> torch.device:
    """``$BBDROP_TEST_DEVICE`` (default cpu); a CUDA device that is not there fails the
    test rather than skipping it: the GPU check asked for it."""
    name = os.environ.get("BBDROP_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"BBDROP_TEST_DEVICE={name} but torch sees no CUDA device")
    return torch.device(name)


def gated(method: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LeNet5 with ``method``'s gates, after one training pass (DBB's statistics), on
    the CPU, with a batch."""
    torch.manual_seed(seed)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    net = lenet5_caffe(num_classes=10)
    bbdrop.attach_gates_(net, method)
    net.train()
    net(x)
    return net, x, y


@pytest.mark.parametrize("method", METHODS)
def test_the_test_time_network_and_the_kl_agree_with_the_cpu(
    method: str, device: torch.device
) -> None:
    net, x, _ = gated(method)
    net.eval()
    moved = copy.deepcopy(net).to(device)
    with torch.no_grad():
        torch.testing.assert_close(moved(x.to(device)).cpu(), net(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            bbdrop.total_kl(moved).cpu(), bbdrop.total_kl(net), rtol=1e-5, atol=1e-4
        )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_a_training_step_on_the_device_is_finite(
    method: str, precision: str, device: torch.device
) -> None:
    net, x, y = gated(method)
    net = net.to(device)
    loss, _, _ = _objective(net, 1000, False, precision)(x.to(device), y.to(device))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_a_stage_trains_resumes_and_compacts_on_the_device(
    device: torch.device, tmp_path: Path
) -> None:
    """Two epochs in one call, and one plus one in two calls (the first stopped), end
    with the same weights (bit for bit on the CPU; within 1e-5 elsewhere), and the
    compacted network computes what the gated one does, on the device."""
    torch.manual_seed(0)
    x = torch.randn(200, 1, 28, 28, device=device)
    y = (x.flatten(1)[:, :10].argmax(1)).to(device)

    def stage(
        checkpoint: Path, epochs: int, stop_after: int | None = None
    ) -> tuple[nn.Module, int]:
        torch.manual_seed(1)
        net = lenet5_caffe(num_classes=10)
        bbdrop.attach_gates_(net, "bb")
        net = net.to(device)
        gen = torch.Generator(device="cpu").manual_seed(2)
        batches = _Stopping(BatchIterator(x, y, 50, shuffle=True, generator=gen), stop_after)
        try:
            train_stage(net, batches, stage="bb", epochs=epochs, num_train=200,
                        optim=OptimConfig(batch_size=50), evaluate_on=(x, y),
                        checkpoint=checkpoint, generator=gen)  # fmt: skip
        except _Stop:
            pass
        return net, batches.epochs

    straight, _ = stage(tmp_path / "a.pt", 2)
    stage(tmp_path / "b.pt", 2, stop_after=1)  # dies as its second epoch starts
    resumed, trained = stage(tmp_path / "b.pt", 2)
    assert trained == 1  # it went on from the checkpoint, not from the start
    exact = device.type == "cpu"
    resumed_state = resumed.state_dict()
    assert straight.state_dict().keys() == resumed_state.keys()
    for name, a in straight.state_dict().items():
        b = resumed_state[name]
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    straight.eval()
    small = bbdrop.compact(straight, x[:8])
    assert next(small.parameters()).device.type == device.type
    with torch.no_grad():
        torch.testing.assert_close(small(x), straight(x), rtol=1e-4, atol=1e-4)


def test_the_compacted_network_exports_to_onnx_from_the_device(
    device: torch.device, tmp_path: Path
) -> None:
    ort = pytest.importorskip("onnxruntime")
    net, x, _ = gated("bb")
    net = net.to(device).eval()
    small = bbdrop.compact(net, x[:8].to(device))
    bbdrop.export_onnx(small, x[:2].to(device), tmp_path / "small.onnx")
    session = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = small(x.to(device)).cpu()
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


class _Stop(Exception):
    pass


class _Stopping:
    """``batches``, except that the epoch after ``stop_after`` epochs raises
    :class:`_Stop` (a run killed mid-epoch, its checkpoint the last completed epoch's)."""

    def __init__(self, batches: BatchIterator, stop_after: int | None) -> None:
        self.batches, self.stop_after, self.epochs = batches, stop_after, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.stop_after is not None and self.epochs >= self.stop_after:
            raise _Stop
        self.epochs += 1
        yield from self.batches
