"""How many CPU threads a run computes with.

torch splits each operation among its OpenMP threads and waits at a barrier
for all of them. An operation of a small network lasts a few microseconds, so
with two threads most of its time is the barrier; and when another job keeps
a core busy, the barrier waits for a thread the kernel is not running: the
8x8-digits demo then slowed from seconds to minutes (docs/benchmarks.md,
"Threads"). :func:`auto_threads` therefore gives small networks one thread and
larger ones every core this process may use; ``threads = N`` in a
configuration (``--threads N``) overrides it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["SMALL_BATCH_FLOPS", "auto_threads", "available_cores", "machine", "num_threads"]

# Below this many FLOPs in one training batch's forward pass, one thread is as
# fast as two on an idle machine and much faster on a loaded one (measured:
# docs/benchmarks.md, "Threads").
SMALL_BATCH_FLOPS = 200e6


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def auto_threads(flops_per_batch: float) -> int:
    """One thread for a training batch below :data:`SMALL_BATCH_FLOPS`, else every core."""
    return 1 if flops_per_batch < SMALL_BATCH_FLOPS else available_cores()


@contextmanager
def num_threads(n: int) -> Iterator[int]:
    """``torch.set_num_threads(n)`` for the ``with`` block, then back to what it was."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an int >= 1, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def machine() -> str:
    """The CPU's model name and core count, e.g. ``"AMD EPYC, 2 cores"``: float results
    differ from one CPU model to another (other kernels, other rounding), so figures
    are recorded with the machine that made them."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"
