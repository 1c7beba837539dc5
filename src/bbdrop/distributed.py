"""Training on several processes (``torchrun``): what each rank computes, what is reduced.

Under ``torchrun --nproc_per_node N`` every rank runs the same program on the same data
and the same seed. :func:`bbdrop.train.loop.train_stage` then:

* gives each rank its share of every batch: the batches are the configured (global)
  ones, split into N contiguous shards, so the result does not depend on N;
* trains through ``DistributedDataParallel``, which averages the gradients; a rank's
  cross-entropy is weighted by its share of the batch, so that the average is the
  global batch's mean even when the shards differ in size, and the KL term, the same on
  every rank, is counted once with the full training set's N;
* draws per-example noise for the whole batch on every rank and keeps its own rows
  (:func:`example_noise`), so each example sees the noise it sees in one process, and
  every rank's random stream stays the same as the single process's;
* all-reduces DBB's batch statistics (the mean and variance over the global batch, as
  ``SyncBatchNorm`` does), so its running statistics are the same on every rank;
* evaluates on every rank (the ranks hold the same network) and writes its checkpoint
  from rank 0 alone, the others waiting until it is written;
* with ``compile``, starts each stage from an empty compile cache (:func:`fresh_compile`).

One process (no ``torchrun``) is the default and is unchanged: every function here is
then the identity.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
_SHARD: tuple[int, int, int] | None = None  # (start, stop, total) rows of the global batch


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes (0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def world() -> World:
    """The current world: torch.distributed's when it is initialised, else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: torch.device) -> World:
    """Join the process group that ``torchrun`` describes in the environment (nccl on
    CUDA, each rank on its ``LOCAL_RANK``'s GPU; gloo on the CPU); one process when
    ``WORLD_SIZE`` is absent or 1. Returns the world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch was built without torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world()


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` in every process, process 0's first (it downloads, say, what the others
    then read)."""
    w = world()
    if not w.main:
        w.barrier()
    result = fn()
    if w.main:
        w.barrier()
    return result


def main_only(fn: Callable[[], object]) -> None:
    """``fn()`` in process 0 alone (it writes), once every process has come here; the
    others wait until it is done."""
    w = world()
    w.barrier()
    if w.main:
        fn()
    w.barrier()


def fresh_compile(compile: bool, w: World) -> None:
    """Under torchrun, a compiled stage starts from an empty ``torch.compile`` cache
    (``torch._dynamo.reset()``). Otherwise the DBB stage of a pipeline (pretraining, BB,
    then DBB, each compiled in its own DDP wrapper) met graphs compiled for the stages
    before it, and DDP found DBB's ``scale`` without a gradient on its first step and
    stopped on its second ("Expected to have finished reduction in the prior iteration").
    Each stage compiles its step anew in any case: its network differs. One process keeps
    its cache (and the single-process path stays as it was)."""
    if compile and w.size > 1:
        torch._dynamo.reset()


def shard(x: Tensor, y: Tensor, w: World) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """Rank ``w.rank``'s contiguous share of a global batch and its (start, stop, total)."""
    total = x.shape[0]
    if total < w.size:
        raise ValueError(
            f"a batch of {total} examples cannot be shared by {w.size} processes: use a "
            f"batch size of at least {w.size} (optim.batch_size) or fewer processes"
        )
    bounds = [total * r // w.size for r in range(w.size + 1)]
    start, stop = bounds[w.rank], bounds[w.rank + 1]
    return x[start:stop], y[start:stop], (start, stop, total)


@contextlib.contextmanager
def batch_shard(rows: tuple[int, int, int] | None) -> Iterator[None]:
    """Within it, :func:`example_noise` draws for the global batch of ``rows``."""
    global _SHARD
    before, _SHARD = _SHARD, rows
    try:
        yield
    finally:
        _SHARD = before


def example_noise(draw: Callable[[tuple[int, ...]], Tensor], shape: tuple[int, ...]) -> Tensor:
    """``draw(shape)``, noise whose first dimension is the examples (rank 2 or more). On
    a rank's shard of a batch, drawn for the whole batch and cut to the rank's rows: each
    example gets the noise it gets in one process, and every rank consumes its random
    stream as one process does."""
    rows = _SHARD
    if rows is None or len(shape) < 2 or shape[0] != rows[1] - rows[0]:
        return draw(tuple(shape))
    start, stop, total = rows
    return draw((total, *shape[1:]))[start:stop]


def sharded() -> bool:
    """Whether a rank's shard of a batch is being computed (several processes)."""
    return _SHARD is not None and world().size > 1


def batch_moments(h: Tensor) -> tuple[Tensor, Tensor, int]:
    """The mean and (biased) variance over dimension 0 of the global batch whose rows
    ``h`` holds a shard of, and the batch's size: two all-reduces, the variance taken
    about the global mean (call it when :func:`sharded`)."""
    assert _SHARD is not None
    total = _SHARD[2]
    summed = h.sum(dim=0)
    dist.all_reduce(summed)
    mean = summed / total
    squares = (h - mean).square().sum(dim=0)
    dist.all_reduce(squares)
    return mean, squares / total, total


def all_mean(t: Tensor) -> Tensor:
    """``t`` averaged over the ranks (``t`` itself in one process)."""
    if world().size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world().size
