"""One training stage: optimiser groups, schedule, evaluation, resume after a kill."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.data import BatchIterator
from bbdrop.train.loop import CompileError, build_optimizer, evaluate, train_stage


def data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()  # 3 classes, learnable
    return x, y


def batches_of(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, size: int = 50):
    return BatchIterator(x, y, size, shuffle=True, generator=generator)


def gated_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    return bbdrop.attach_gates_(net, "bb")


def test_optimizer_groups_and_schedule() -> None:
    net = bbdrop.convert_gates_(gated_mlp(), "dbb", freeze_bb=True)
    opt, sched = build_optimizer(net, OptimConfig(decay_gates=True), epochs=10)
    weights, gates = opt.param_groups
    assert (weights["lr"], weights["weight_decay"]) == (1e-3, 1e-4)
    assert (gates["lr"], gates["weight_decay"]) == (1e-2, 0.0)
    gate_params = {id(p) for p in gates["params"]}
    for _, g in bbdrop.gated_layers(net):
        assert id(g.gate.a_raw) not in gate_params  # frozen BB posterior left out
        assert id(g.gate.shift) in gate_params
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [w for w, _ in lrs] == pytest.approx([1e-3] * 5 + [1e-4] * 3 + [1e-5] * 2)
    assert [g for _, g in lrs] == pytest.approx([1e-2] * 5 + [1e-3] * 3 + [1e-4] * 2)
    opt, sched = build_optimizer(net, OptimConfig(decay_gates=False), epochs=10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 1e-2])


def test_evaluate_counts_errors() -> None:
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x[:, 0], -x[:, 0]], dim=1)

    x = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])
    y = torch.tensor([0, 1, 1, 0])
    assert evaluate(Fixed(), x, y, batch_size=3) == 25.0


def run(tmp: Path, kill_after: int | None = None) -> tuple[nn.Module, list]:
    x, y = data()
    net = gated_mlp()
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)

    def progress(stage: str, record, epochs: int) -> None:
        if kill_after is not None and record.epoch == kill_after:
            raise KeyboardInterrupt

    history = train_stage(
        net,
        batches_of(x, y, gen),
        stage="bb",
        epochs=4,
        num_train=200,
        optim=OptimConfig(),
        evaluate_on=data(100, 9),
        checkpoint=tmp / "bb.last.pt",
        generator=gen,
        progress=progress,
    )
    return net, history


def test_a_killed_stage_resumes_to_the_same_result(tmp_path: Path) -> None:
    straight, history = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_after=2)
    # a new process: fresh model and generators, same checkpoint path
    resumed, history_b = run(tmp_path / "b")
    for (n, p), (_, q) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), n
    assert [r.epoch for r in history_b] == [1, 2, 3, 4]
    assert [r.to_dict() | {"seconds": 0} for r in history_b] == [
        r.to_dict() | {"seconds": 0} for r in history
    ]


def test_training_lowers_the_loss_and_records_units(tmp_path: Path) -> None:
    _, history = run(tmp_path)
    assert history[-1].cross_entropy < history[0].cross_entropy
    assert history[0].kl > 0
    assert set(history[0].units) == {"0", "2"}
    assert history[0].loss == pytest.approx(
        history[0].cross_entropy + history[0].kl / 200, rel=1e-6
    )


def test_a_checkpoint_of_another_stage_is_refused(tmp_path: Path) -> None:
    run(tmp_path)
    x, y = data()
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="holds stage 'bb' of 4 epochs"):
        train_stage(
            gated_mlp(), batches_of(x, y, gen), stage="dbb", epochs=4, num_train=200,
            optim=OptimConfig(), evaluate_on=data(100, 9), checkpoint=tmp_path / "bb.last.pt",
            generator=gen,
        )  # fmt: skip
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        train_stage(
            gated_mlp(), batches_of(x, y, gen), stage="bb", epochs=0, num_train=200,
            optim=OptimConfig(), evaluate_on=data(100, 9),
        )  # fmt: skip


def test_milestones_fall_where_the_authors_int_puts_them() -> None:
    """7 epochs, milestones 0.5 and 0.8: int gives epochs 3 and 5 (round gave 4 and 6)."""
    opt, sched = build_optimizer(gated_mlp(), OptimConfig(decay_gates=True), epochs=7)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3] * 3 + [1e-4] * 2 + [1e-5] * 2)
    opt, sched = build_optimizer(gated_mlp(), OptimConfig(decay_gates=True), epochs=1)
    assert opt.param_groups[0]["lr"] == 1e-3  # int(0.5) = 0 would start decayed: moved to 1


def _flushed_fraction() -> float:
    """Share of a parallel multiply of denormals that comes out as zero."""
    from bbdrop.train.denormals import denormal_tensor

    tiny = denormal_tensor(1 << 22)
    return ((tiny * 1.0) == 0).float().mean().item()


def test_denormals_are_flushed_in_every_thread_or_in_none(tmp_path: Path) -> None:
    """torch.set_flush_denormal sets the calling thread's mode only: with it alone, part
    of a parallel operation (the OpenMP workers' share) keeps denormals. A stage sets the
    mode in every thread; flush_denormals=False leaves the process as it was."""
    from bbdrop.train.denormals import denormal_tensor, flush_denormals

    threads = torch.get_num_threads()
    try:
        # threads first, then the mode (as flush_denormals asks): a pool worker that an
        # earlier test left flushing, idle while the pool was smaller, is reset too; and
        # the pool's worker exists before the calling thread's mode changes below (a
        # thread started later inherits the mode of the one starting it)
        torch.set_num_threads(2)
        flush_denormals(False)
        assert 0 < denormal_tensor(1)[0].item() < torch.finfo(torch.float32).tiny
        assert _flushed_fraction() == 0.0
        torch.set_flush_denormal(True)  # the calling thread only
        if torch.set_flush_denormal(True):  # a CPU with the mode
            assert _flushed_fraction() == pytest.approx(0.5, abs=0.01)  # the defect
        flush_denormals(False)
        run(tmp_path / "a")  # flush_denormals=True by default
        assert _flushed_fraction() in (0.0, 1.0)  # the same mode in every thread
        flush_denormals(False)
        x, y = data()
        gen = torch.Generator().manual_seed(1)
        train_stage(
            gated_mlp(), batches_of(x, y, gen), stage="bb", epochs=1, num_train=200,
            optim=OptimConfig(), evaluate_on=data(100, 9), flush_denormals=False,
        )  # fmt: skip
        assert _flushed_fraction() == 0.0
    finally:
        flush_denormals(False)
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
def test_compiled_training_gives_a_working_stage(tmp_path: Path) -> None:
    """torch.compile on the CPU (inductor builds C++): the stage trains."""
    x, y = data()
    net = gated_mlp()
    gen = torch.Generator().manual_seed(1)
    history = train_stage(
        net, batches_of(x, y, gen), stage="bb", epochs=2, num_train=200,
        optim=OptimConfig(), evaluate_on=data(100, 9), generator=gen, compile=True,
    )  # fmt: skip
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r.loss)) for r in history)
    assert history[-1].loss == pytest.approx(history[-1].cross_entropy + history[-1].kl / 200)
    assert history[-1].cross_entropy < history[0].cross_entropy * 1.05


def test_a_compiler_that_cannot_build_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn):
        def call(*args):
            raise OSError("C++ compiler not found")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    x, y = data()
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(CompileError, match=r"could not build.*OSError: C\+\+ compiler not found"):
        train_stage(
            gated_mlp(), batches_of(x, y, gen), stage="bb", epochs=1, num_train=200,
            optim=OptimConfig(), evaluate_on=data(100, 9), compile=True,
        )  # fmt: skip


@pytest.mark.slow  # dynamo's first trace in a process imports its stack: seconds
def test_the_gates_compile_without_a_graph_break_and_zero_removed_units() -> None:
    """A DBB gate's training forward pass (BB's draw and DBB's on top, the removal of the
    base class every method shares) compiles without a graph break (a host read of a
    flag in every gated layer used to break it), with eager's outputs, and a unit removed
    for good (a budget's removal) counts for nothing, compiled or not. Dynamo's ``eager``
    backend: inductor's graph capture, without building C++."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    bbdrop.attach_gates_(net, "dbb", example=torch.randn(8, 20))
    net[0].gate.static_keep[0] = False  # hidden unit 0 (the group's), removed for good
    moved = copy.deepcopy(net)  # what hidden unit 0 computes, changed
    with torch.no_grad():
        moved[0].weight[0] += 5.0
        moved[0].bias[0] += 5.0
    x = torch.randn(8, 20)
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    outputs = []
    for model in (net, moved):
        for run in (model, torch.compile(model, backend="eager")):
            torch.manual_seed(3)  # the same draws of the gates' noise
            outputs.append(run(x))
    assert torch.isfinite(outputs[0]).all()
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=0)
