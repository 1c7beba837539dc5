"""Run a function in spawned worker processes that live no longer than their parent.

``bbdrop reproduce --jobs N`` and ``bbdrop sweep --jobs N`` train several runs at
once, one per process. :func:`run_all` runs them so that stopping the parent stops
everything:

* the children die with the parent, however it ends: on Linux the kernel sends them
  SIGKILL when it does (``prctl(PR_SET_PDEATHSIG)``), and on every platform a thread
  in each child ends it within half a second of its parent's end;
* Ctrl-C (SIGINT) and SIGTERM to the parent stop the running children (SIGTERM,
  then SIGKILL after :data:`TERMINATE_GRACE` seconds) and then end the parent:
  KeyboardInterrupt for SIGINT, ``SystemExit(143)`` for SIGTERM; the children ignore
  SIGINT, so a terminal's Ctrl-C (sent to the whole process group) reaches them only
  through the parent and prints no worker's traceback;
* no multiprocessing Manager, Queue, Lock or Semaphore: each child has its own pipe,
  and the parent waits on the pipes and the children's sentinels.

Each run (``bbdrop.pipeline.run_pipeline``) writes a checkpoint after every epoch and
resumes from it, so a stopped or killed child loses at most the epoch it was in.
Children are started with the ``spawn`` method: a forked child of a process whose
OpenMP pool has started can hang.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from bbdrop import validate

__all__ = ["TERMINATE_GRACE", "RemoteTraceback", "Terminated", "run_all"]

TERMINATE_GRACE = 3.0  # seconds a child has, after SIGTERM, before SIGKILL
_POLL_S = 0.25  # the longest the parent waits before it looks at the signals noted
_WATCH_S = 0.5  # how often a child checks that its parent is alive
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_DIED = "died"  # a child's outcome when it ended without a reply


class RemoteTraceback(Exception):
    """A worker's traceback, as text: the ``__cause__`` of an exception that
    :func:`run_all` re-raises from a worker, so that the traceback printed shows where
    in the worker the error arose."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}" if self.args else ""


@dataclass
class _Child:
    """A started worker: its item's index, its process, the end of its pipe the
    parent reads, and its last word (None until it sends a result or an error)."""

    index: int
    process: BaseProcess
    conn: Connection
    reply: tuple[Any, ...] | None = None
    eof: bool = False


class Terminated(SystemExit):
    """The parent was asked to stop (SIGTERM) and has stopped its children; its code is
    143, as a shell reports for a process ended by SIGTERM."""


def run_all(
    target: Callable[[Any, Callable[[Any], None]], Any],
    items: Sequence[Any],
    jobs: int,
    *,
    on_message: Callable[[int, Any], None] | None = None,
    labels: Sequence[Any] | None = None,
    what: str = "items",
) -> list[Any]:
    """``[target(item, send) for item in items]``, each call in its own spawned
    process, at most ``jobs`` at a time; the results in the order of ``items``.

    ``target`` and the items must be picklable (``target`` a module-level function).
    ``send(obj)`` in a child delivers ``obj`` to ``on_message(index, obj)`` in the
    parent, ``index`` being the item's place in ``items`` (progress reports).

    When a child raises, no further item is started; the children running finish
    (each run is resumable, so their work is kept), then its exception is re-raised
    here (a RuntimeError with its text when it cannot be pickled), with the child's
    traceback as its ``__cause__``. A child that ends without a result (killed, out
    of memory) raises ChildProcessError naming, by ``labels`` (default: the items'
    indices) and ``what`` ("seeds"), the items left unfinished.

    SIGINT or SIGTERM to the parent while this runs (in the main thread, where their
    handlers are Python's defaults) stops the running children at once and raises
    KeyboardInterrupt, or :class:`Terminated` (a SystemExit of 143, a shell's status
    for a process ended by SIGTERM, reached through ``finally`` blocks and exit
    handlers) respectively.
    """
    items = list(items)
    names = [str(x) for x in labels] if labels is not None else list(map(str, range(len(items))))
    if len(names) != len(items):
        raise ValueError(f"labels has {len(names)} entries for {len(items)} items")
    validate.whole("jobs", jobs, lo=1)
    results: dict[int, Any] = {}
    with _signals_noted() as caught:
        failure = _supervise(target, items, min(jobs, len(items)), on_message, caught, results)
    if caught:
        if caught[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(128 + signal.SIGTERM)
    if failure == _DIED:
        left = [n for i, n in enumerate(names) if i not in results]
        raise ChildProcessError(
            f"a worker process died (killed, or out of memory) while {what} "
            f"{', '.join(dict.fromkeys(left))} were unfinished; their finished epochs are "
            "kept: run the same command again to resume"
        )
    if isinstance(failure, BaseException):
        raise failure
    return [results[i] for i in range(len(items))]


def _supervise(
    target: Callable[[Any, Callable[[Any], None]], Any],
    items: list[Any],
    jobs: int,
    on_message: Callable[[int, Any], None] | None,
    caught: list[int],
    results: dict[int, Any],
) -> BaseException | str | None:
    """Start the children (``jobs`` at a time), deliver their messages, put their
    results in ``results``; return the first failure (an exception, or :data:`_DIED`),
    or None. A signal noted in ``caught``, or any exception here (one from
    ``on_message`` included), stops the children running; after a failure the
    children running finish and no other starts."""
    ctx = multiprocessing.get_context("spawn")
    if os.name == "posix":  # started now, not inside _start: it unblocks SIGINT
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    waiting = deque(range(len(items)))
    running: dict[int, _Child] = {}
    failure: BaseException | str | None = None
    try:
        while running or (waiting and failure is None):
            while waiting and failure is None and not caught and len(running) < jobs:
                index = waiting.popleft()
                running[index] = _start(ctx, target, items[index], index)
            if caught:
                break
            for child in _poll(running.values(), on_message):
                del running[child.index]
                outcome = _outcome(child)
                if outcome is None:
                    results[child.index] = child.reply[1]  # type: ignore[index]
                elif failure is None:
                    failure = outcome
    finally:
        _stop(running.values())  # none left unless a signal or an exception came
    return failure


def _start(ctx: Any, target: Callable[..., Any], item: Any, index: int) -> _Child:
    """Spawn the child for ``items[index]``, with SIGINT blocked meanwhile so that the
    new process starts with it blocked (a mask is inherited): a Ctrl-C while it starts
    Python and imports the modules it needs cannot end it with a traceback."""
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_child_main, args=(target, item, sender, os.getpid()), name=f"worker-{index}"
    )
    try:
        with _sigint_blocked():
            process.start()
    except BaseException:
        receiver.close()
        raise
    finally:
        sender.close()  # the child's copy is the only one left: its end is our EOF
    return _Child(index, process, receiver)


def _poll(running: Iterable[_Child], on_message: Callable[[int, Any], None] | None) -> list[_Child]:
    """Wait up to :data:`_POLL_S` seconds for the children's messages or ends; deliver
    the messages; return the children that ended (joined, their pipe read to the end)."""
    running = list(running)
    ends = {id(c.conn): c for c in running if not c.eof}
    sentinels = {c.process.sentinel: c for c in running}
    ready = wait([*(c.conn for c in ends.values()), *sentinels], timeout=_POLL_S)
    for obj in ready:
        if isinstance(obj, Connection):
            _receive(ends[id(obj)], on_message)
    ended = [sentinels[obj] for obj in ready if not isinstance(obj, Connection)]
    for child in ended:  # every message first: on_message may raise, and then every
        while not child.eof and child.conn.poll(0):  # child must still be open for _stop
            _receive(child, on_message)
    for child in ended:
        child.process.join()
        child.conn.close()
        child.process.close()
    return ended


def _receive(child: _Child, on_message: Callable[[int, Any], None] | None) -> None:
    """Read one message from ``child``: a progress message goes to ``on_message``, a
    result or an error becomes its reply; the end of the pipe sets ``child.eof``."""
    try:
        kind, *body = child.conn.recv()
    except (EOFError, OSError):
        child.eof = True
        return
    except Exception as err:  # a reply that does not unpickle here
        child.reply = ("error", RuntimeError(f"a worker's reply could not be read: {err}"), "")
        return
    if kind == "message":
        if on_message is not None:
            on_message(child.index, body[0])
    else:
        child.reply = (kind, *body)


def _outcome(child: _Child) -> BaseException | str | None:
    """None for a child that returned its result, else its failure: the exception it
    raised (with its traceback as ``__cause__``) or :data:`_DIED`."""
    if child.reply is None:
        return _DIED
    if child.reply[0] == "result":
        return None
    _, err, text = child.reply
    if text:
        err.__cause__ = RemoteTraceback(text)
    return err


def _stop(children: Iterable[_Child]) -> None:
    """End ``children``: SIGTERM, then SIGKILL to those alive :data:`TERMINATE_GRACE`
    seconds later; join them and close their pipes. The runs they were in keep their
    checkpoints (written atomically); their folder locks go with them."""
    children = list(children)
    for child in children:
        if child.process.exitcode is None:
            child.process.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE
    for child in children:
        child.process.join(max(0.0, deadline - time.monotonic()))
        if child.process.exitcode is None:
            child.process.kill()
            child.process.join()
        child.conn.close()
        child.process.close()


@contextlib.contextmanager
def _signals_noted() -> Iterator[list[int]]:
    """For the ``with`` block, SIGINT and SIGTERM are noted in the list yielded instead
    of acting (KeyboardInterrupt; the process's death), so that the parent can stop its
    children before it stops. Only in the main thread (the only one Python lets set
    handlers) and only for a signal whose handler is Python's default: a handler the
    application installed is left to act (an exception it raises stops the children)."""
    caught: list[int] = []
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    before = {}
    if threading.current_thread() is threading.main_thread():
        before = {s: signal.getsignal(s) for s in defaults}
        before = {s: h for s, h in before.items() if h == defaults[s]}
    try:
        for signum in before:
            signal.signal(signum, lambda number, frame: caught.append(number))
        yield caught
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread for the ``with`` block (where the OS has signal
    masks); one that arrives meanwhile is delivered when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _child_main(
    target: Callable[[Any, Callable[[Any], None]], Any],
    item: Any,
    conn: Connection,
    parent_pid: int,
) -> None:
    """A worker process: ignore SIGINT (the parent decides), die with the parent, run
    ``target(item, send)`` and send back its result, or the exception it raised."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by _start
    _die_with_parent(parent_pid)

    def send(obj: Any) -> None:
        conn.send(("message", obj))

    try:
        reply: tuple[Any, ...] = ("result", target(item, send))
    except BaseException as err:
        reply = ("error", _portable(err), traceback.format_exc())
    try:
        conn.send(reply)
    except Exception as err:  # a result that does not pickle
        text = f"the worker's result could not be sent: {type(err).__name__}: {err}"
        conn.send(("error", RuntimeError(text), traceback.format_exc()))
    conn.close()


def _portable(err: BaseException) -> Exception:
    """``err`` if it survives a trip through pickle, else a RuntimeError with its text
    (the parent must be able to raise it, and not as a SystemExit)."""
    if isinstance(err, Exception):
        try:
            pickle.loads(pickle.dumps(err))
            return err
        except Exception:
            pass
    return RuntimeError(f"{type(err).__name__}: {err}")


def _die_with_parent(parent_pid: int) -> None:
    """Make this process end when its parent (``parent_pid``) does: on Linux the kernel
    sends SIGKILL on the parent's death; everywhere a daemon thread checks every
    :data:`_WATCH_S` seconds. A parent that died before this ran ends it now."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL),
                       ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))  # fmt: skip
        except (OSError, AttributeError):
            pass  # no prctl: the thread below still watches
    if not _parent_alive(parent_pid):
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True
    ).start()


def _parent_alive(parent_pid: int) -> bool:
    """Whether the process that started this one still runs: it is still our parent
    (a dead parent's children are adopted by another) and its sentinel (a pipe on
    POSIX, a handle on Windows, where children are not adopted) has not closed."""
    parent = multiprocessing.parent_process()
    return os.getppid() == parent_pid and (parent is None or parent.is_alive())


def _watch_parent(parent_pid: int) -> None:
    """End this process as soon as its parent is gone (checked every :data:`_WATCH_S`
    seconds): its work is the parent's, and nobody would read its result."""
    while _parent_alive(parent_pid):
        time.sleep(_WATCH_S)
    os._exit(1)
