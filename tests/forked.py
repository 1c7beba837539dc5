"""Processes forked from the test process, for the end-to-end tests that kill runs.

A fresh ``python -m bbdrop`` spends about 3 s importing torch before it does anything.
A test that kills a run at six moments pays that seven times or more. A forked child
starts from the test process, torch already imported, and runs the same entry point
(``bbdrop.cli.main``, or a test's own script). The kill tests are about what a killed
run leaves behind and how the next one resumes, and a forked run dies the same way.
The CLI's own start (``python -m bbdrop``, its console script) has tests of its own
(test_cli.py, test_workers.py).

The child computes on one thread (``torch.set_num_threads(1)``), as the runs these
tests start do anyway: a fork keeps only the forking thread, so a child must not count
on the parent's thread pool.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

needs_fork = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork (POSIX)"
)


def forked(
    target: Callable[..., Any],
    *args: Any,
    env: dict[str, str | None] | None = None,
    stderr: Path | None = None,
) -> multiprocessing.Process:
    """Start ``target(*args)`` in a forked child and return it (``.exitcode``, ``.kill()``,
    ``.join()``). ``env``: variables set in the child (None: removed). Its stdout goes
    to /dev/null, its stderr to the file ``stderr`` (appended) or /dev/null. The exit
    code is ``target``'s return value (an int; 0 otherwise), a ``SystemExit``'s code,
    or 1 after an exception, whose traceback goes to stderr."""
    # torch imports torch._dynamo the first time an optimiser is built (seconds): import
    # it here, once, so that every child starts with it instead of importing it again
    import torch._dynamo  # noqa: F401

    process = multiprocessing.get_context("fork").Process(
        target=_child, args=(target, args, env or {}, stderr), daemon=True
    )
    process.start()
    return process


def _child(
    target: Callable[..., Any], args: tuple[Any, ...], env: dict[str, str | None],
    stderr: Path | None,
) -> None:  # fmt: skip
    import torch

    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if stderr else null
    os.dup2(err, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    torch.set_num_threads(1)
    # tqdm's write lock is shared between processes (a semaphore) once the test process
    # has made a progress bar (an in-process run of an earlier test): a child killed while
    # holding it would leave the next children waiting on it for ever. One of its own:
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    code = 0
    try:
        result = target(*args)
        code = result if isinstance(result, int) else 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
