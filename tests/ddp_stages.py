"""BB then DBB (BB frozen) on LeNet-500-300 with ``train_stage``, EPOCHS epochs each, then
``bbdrop.sparsify`` (BB) of a small MLP with a checkpoint folder, on random data, in DTYPE
(float32 or float64). Run as one process (``python tests/ddp_stages.py OUT EPOCHS DTYPE``)
or under ``torchrun``. Each rank
writes its final weights and buffers, and the units each gate keeps, to
``OUT/rank-<r>.pt``; rank 0 writes the checkpoints, from which the same command run again
resumes. ``DIE=rank:stage:epoch:batch`` SIGKILLs that rank as it reaches that batch.
tests/test_distributed.py compares the runs."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

import bbdrop
from bbdrop.config import OptimConfig
from bbdrop.data.batches import BatchIterator
from bbdrop.distributed import world
from bbdrop.models import lenet_500_300
from bbdrop.train.loop import train_stage


class Dying:
    """``batches``, except that rank ``rank`` kills itself at batch ``at`` (1-based) of
    epoch ``epoch`` of stage ``stage``, as given by $DIE."""

    def __init__(self, batches: BatchIterator, stage: str) -> None:
        self.batches, self.stage, self.epoch = batches, stage, 0
        self.die = os.environ.get("DIE", "").split(":")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch += 1
        for i, batch in enumerate(self.batches, 1):
            rank, stage, epoch, at = self.die if len(self.die) == 4 else ("", "", "", "")
            if (str(world().rank), self.stage, str(self.epoch), str(i)) == (rank, stage, epoch, at):
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def main(out: Path, epochs: int, dtype: torch.dtype = torch.float32) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(dtype)  # the data, the networks and their gates
    torch.manual_seed(0)
    x = torch.rand(200, 1, 28, 28)
    y = (x.flatten(1)[:, :10].argmax(1) + x.flatten(1)[:, 10:20].argmax(1)) % 10
    net = lenet_500_300(num_classes=10)
    bbdrop.attach_gates_(net, "bb")
    gen = torch.Generator().manual_seed(1)
    batches = BatchIterator(x, y, 45, shuffle=True, generator=gen)  # 4 x 45 + 20: uneven shards
    optim = OptimConfig(batch_size=45)
    for stage in ("bb", "dbb"):
        if stage == "dbb":
            bbdrop.convert_gates_(net, "dbb", freeze_bb=True)
        train_stage(net, Dying(batches, stage), stage=stage, epochs=epochs, num_train=200,
                    optim=optim,
                    evaluate_on=(x[:100], y[:100]), checkpoint=out / f"{stage}.last.pt",
                    generator=gen)  # fmt: skip
    # the recipe too: sparsify with a checkpoint folder, on uneven shards of batches of 45
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))  # fmt: skip
    result = bbdrop.sparsify(mlp, (x, y), method="bb", epochs=epochs, batch_size=45, seed=3,
                             checkpoint_dir=out / "sparsify")  # fmt: skip
    rank = world().rank
    torch.save({"state": net.state_dict(), "units": bbdrop.units_kept(net),
                "sparsify": result.gated.state_dict(),
                "sparsify_units": bbdrop.units_kept(result.gated)},
               out / f"rank-{rank}.pt")  # fmt: skip


def compiled(out: Path) -> None:
    """Pretraining, then DBB, of LeNet-500-300, each stage one epoch of two batches through
    ``torch.compile`` with the ``eager`` backend: dynamo's graph capture and its split of
    the graph at DDP's buckets, as with the default backend, which then builds kernels (C++
    on the CPU, seconds more a stage). Rank 0 writes ``OUT/compiled.pt``: the network as the
    DBB stage starts and ends."""
    import functools

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(80, 1, 28, 28)
    y = x.flatten(1)[:, :10].argmax(1)
    net = lenet_500_300(num_classes=10)
    gen = torch.Generator().manual_seed(1)
    batches = BatchIterator(x, y, 40, shuffle=True, generator=gen)
    original = torch.compile
    torch.compile = functools.partial(original, backend="eager")  # type: ignore[assignment]
    try:
        for stage in ("pretrain", "dbb"):
            if stage == "dbb":
                bbdrop.attach_gates_(net, "dbb")
                start = {k: v.detach().clone() for k, v in net.state_dict().items()}
            train_stage(net, batches, stage=stage, epochs=1, num_train=80,
                        optim=OptimConfig(batch_size=40), evaluate_on=(x[:40], y[:40]),
                        compile=True, generator=gen)  # fmt: skip
    finally:
        torch.compile = original
    if world().rank == 0:
        torch.save({"start": start, "end": net.state_dict()}, out / "compiled.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]))
