"""Flushing denormal floats to zero in every thread that computes, or in none.

Late in training, probabilities such as a confident softmax's or a relaxed
Bernoulli mask at temperature 0.1 fall below float32's smallest normal number
(1.2e-38), and x86 CPUs compute on such denormal numbers many times slower:
on this project's CPU protocol a LeNet-500-300 epoch goes from 2 s to 15 s.
``torch.set_flush_denormal(True)`` avoids that, but it sets a flag of the
*calling thread* only; the worker threads of torch's OpenMP pool keep their
own. A program that calls it therefore computes part of every parallel
operation one way and part the other, and its results depend on the thread
count and on which threads existed when it was called.

:func:`flush_denormals` sets the mode in the calling thread and in every
thread of torch's OpenMP pool, checks that a parallel operation on denormals
now gives zeros everywhere, and otherwise sets it back to off everywhere: the
mode is the same in all threads, or it is off.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

__all__ = ["flush_denormals"]

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@functools.cache
def _gomp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch runs its parallel loops on, where it is one."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for path in (
        os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"),
        "libgomp.so.1",
    ):
        try:
            lib = ctypes.CDLL(path)
            lib.GOMP_parallel.argtypes = [_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _in_every_pool_thread(enable: bool) -> bool:
    """Run ``torch.set_flush_denormal(enable)`` in each thread of torch's OpenMP pool."""
    threads = torch.get_num_threads()
    if threads == 1:
        return True
    lib = _gomp()
    if lib is None:
        return False
    callback = _CALLBACK(lambda _: torch.set_flush_denormal(enable))
    lib.GOMP_parallel(callback, None, threads, 0)  # the same team torch's loops use
    return True


def denormal_tensor(n: int) -> torch.Tensor:
    """``n`` float32 denormals (about 1e-39), made from their bits: writing 1e-39 as a
    number would itself be flushed to 0 in a thread that flushes."""
    return torch.full((n,), 0x000AE398, dtype=torch.int32).view(torch.float32)


def _flushed_everywhere() -> bool:
    """A parallel multiply of denormals gives exactly zero in every thread's share."""
    return bool(((denormal_tensor(1 << 20) * 1.0) == 0).all())  # split across the pool


def flush_denormals(enable: bool = True) -> bool:
    """Flush denormals to zero in every computing thread (``enable``), or in none.

    Returns whether denormals are now flushed. False where the CPU has no such
    mode or torch's thread pool cannot be reached (another OpenMP runtime): then
    no thread flushes, and the mode is again the same in every thread.
    Call it again after ``torch.set_num_threads``.
    """
    if enable and torch.set_flush_denormal(True):
        if _in_every_pool_thread(True) and _flushed_everywhere():
            return True
    torch.set_flush_denormal(False)
    _in_every_pool_thread(False)
    return False
