"""bbdrop.workers.run_all: results in order, failures re-raised, and no process that
outlives its parent, whichever way the parent ends (SIGKILL, SIGTERM, Ctrl-C).

Every check runs a parent in its own Python process (and session), so that it can be
killed, and so that a failing test leaves nothing behind: each test kills, in a
``finally``, the processes it found. The unit and lifecycle checks run
:data:`SCRIPT`, which loads ``bbdrop.workers`` (standard library only) without the
package's ``__init__`` (it imports torch: seconds a process on 2 cores), and so do its
spawned children, which run the script's top level before unpickling their work. The
end-to-end checks (``slow``) run ``python -m bbdrop reproduce --jobs 2`` itself (and a
forked ``bbdrop run``, for the line Ctrl-C prints).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import smallfiles
from forked import forked, needs_fork

import bbdrop

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GONE_WITHIN = 10.0  # seconds: how soon the processes of a stopped parent must be gone
# The lifecycle checks find processes, and their parents, in /proc (Linux).
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc")

SCRIPT = r'''
"""A parent of tests/test_workers.py: python SCRIPT SCENARIO FOLDER; prints the outcome."""
import json
import os
import sys
import time
import types

_package = types.ModuleType("bbdrop")  # bbdrop.workers alone: no torch to import
_package.__path__ = [PACKAGE_DIR]
sys.modules.setdefault("bbdrop", _package)
from bbdrop.workers import run_all  # noqa: E402


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def mark(folder, name):
    with open(os.path.join(folder, name + ".tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))


def act(item, send):
    name, action, seconds, folder = item
    mark(folder, f"started-{name}")
    send(["started", name])
    time.sleep(seconds)
    if action == "raise":
        raise ValueError(f"boom from {name}")
    if action == "unpicklable":
        raise Unpicklable(1, 2)
    if action == "exit":
        os._exit(3)
    mark(folder, f"finished-{name}")
    return [name.upper(), time.time()]


SCENARIOS = {
    "order": [("a", "ok", 1.2), ("b", "ok", 0), ("c", "ok", 0.3)],
    "raise": [("a", "raise", 0.2), ("b", "ok", 1.0), ("c", "ok", 0)],
    "exit": [("a", "exit", 0.2), ("b", "ok", 1.0), ("c", "ok", 0)],
    "unpicklable": [("a", "unpicklable", 0)],
    "sleep": [("a", "ok", 600), ("b", "ok", 600), ("c", "ok", 600)],
}

if __name__ == "__main__":
    scenario, folder = sys.argv[1:]
    items = [(*row, folder) for row in SCENARIOS[scenario]]
    messages, outcome = [], {}
    try:
        outcome["results"] = run_all(act, items, 2, on_message=lambda i, m: messages.append([i, m]),
                                     labels=[1, 2, 3][: len(items)], what="seeds")
    except KeyboardInterrupt:
        print("KeyboardInterrupt reached the parent", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        cause = err.__cause__
        outcome["error"] = [type(err).__name__, str(err), type(cause).__name__, str(cause)]
    outcome.update(messages=messages, files=sorted(os.listdir(folder)))
    print(json.dumps(outcome))
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("script") / "parent.py"
    path.write_text(SCRIPT.replace("PACKAGE_DIR", repr(str(Path(bbdrop.__file__).parent))))
    return path


def scenario(script: Path, name: str, folder: Path) -> dict[str, Any]:
    """The outcome the script prints for ``name``, run in ``folder``."""
    done = subprocess.run([sys.executable, str(script), name, str(folder)], env=ENV,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ------------------------------------------------------------------ processes by /proc


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid`` now (by their parent chains), each with its start
    time, so that a pid the system reuses later is not taken for it."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None:
            parents[int(entry.name)] = (int(fields[1]), fields[19])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        below = [p for p, (ppid, _) in parents.items() if ppid in frontier and p not in found]
        found.update({p: parents[p][1] for p in below})
        frontier = below
    return found


def alive(pid: int, started: str) -> bool:
    """Whether that process runs (a zombie no longer does)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == started


def assert_gone(family: dict[int, str]) -> None:
    """Every process of ``family`` ends within :data:`GONE_WITHIN` seconds."""
    deadline = time.monotonic() + GONE_WITHIN
    while any(alive(p, s) for p, s in family.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p, s in family.items() if alive(p, s)]
    assert not left, f"processes {left} outlived their parent by {GONE_WITHIN} s"


def kill_all(parent: subprocess.Popen[Any], family: dict[int, str]) -> None:
    """Leave nothing behind: ``family`` and, while the parent runs, all below it."""
    if parent.poll() is None:
        family = {**descendants(parent.pid), **family}
        parent.kill()
    parent.wait()
    for pid, started in family.items():
        if alive(pid, started):
            os.kill(pid, signal.SIGKILL)


def wait_for(parent: subprocess.Popen[Any], ready: Any, what: str, timeout: float = 90) -> None:
    """Poll ``ready()`` until true; fail if the parent ends first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert parent.poll() is None, f"the parent ended (status {parent.returncode}) {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ unit


@pytest.mark.slow
def test_results_come_in_item_order_and_messages_arrive(script: Path, tmp_path: Path) -> None:
    """jobs=2, 3 items, the second ending first: results in the items' order, and every
    child's message reaches on_message with its item's index."""
    out = scenario(script, "order", tmp_path)
    assert [name for name, _ in out["results"]] == ["A", "B", "C"]
    finished = {name: at for name, at in out["results"]}
    assert finished["B"] < finished["A"]  # b ended first: the order is the items'
    assert sorted(out["messages"]) == [[0, ["started", "a"]], [1, ["started", "b"]],
                                       [2, ["started", "c"]]]  # fmt: skip


@pytest.mark.slow
def test_exception_is_reraised_after_running_children_finish(script: Path, tmp_path: Path) -> None:
    """A child's exception reaches the parent (its traceback as __cause__), but only once
    the child running beside it has finished (runs are resumable: its work is kept);
    the item not yet started never starts."""
    out = scenario(script, "raise", tmp_path)
    kind, message, cause, traceback = out["error"]
    assert (kind, message) == ("ValueError", "boom from a")
    assert cause == "RemoteTraceback" and "in act" in traceback and "boom from a" in traceback
    assert "finished-b" in out["files"]  # the item running finished before the raise
    assert "started-c" not in out["files"]  # the item not started never was


@pytest.mark.slow
def test_unpicklable_exception_becomes_runtime_error(script: Path, tmp_path: Path) -> None:
    """An exception the parent could not unpickle arrives as a RuntimeError with its text."""
    kind, message, *_ = scenario(script, "unpicklable", tmp_path)["error"]
    assert (kind, message) == ("RuntimeError", "Unpicklable: 1 and 2")


@pytest.mark.slow
def test_child_that_dies_names_unfinished_labels(script: Path, tmp_path: Path) -> None:
    """A child that ends without a result (os._exit, as the OOM killer would): the one
    ChildProcessError line, naming the unfinished items (the dead one, the one never
    started) by their labels; the child running beside it finished first."""
    out = scenario(script, "exit", tmp_path)
    assert out["error"][:2] == [
        "ChildProcessError",
        "a worker process died (killed, or out of memory) while seeds 1, 3 were unfinished; "
        "their finished epochs are kept: run the same command again to resume",
    ]
    assert "finished-b" in out["files"] and "started-c" not in out["files"]


# ------------------------------------------------------------------------- lifecycle


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT", "SIGINT to the group"])
def test_children_end_with_their_parent(script: Path, tmp_path: Path, how: str) -> None:
    """Two sleeping children (a third item queued): however the parent is stopped, no
    child (nor the resource tracker) is alive 10 s later, and the queued item never
    starts. SIGINT (to the parent alone, or to its whole group as a terminal's Ctrl-C)
    reaches the parent as KeyboardInterrupt, and no child prints a traceback."""
    log = tmp_path / "stderr"  # a file, not a pipe: a surviving child would hold a pipe open
    with open(log, "w") as stderr:
        parent = subprocess.Popen([sys.executable, str(script), "sleep", str(tmp_path)], env=ENV,
                                  stderr=stderr, start_new_session=True)  # fmt: skip
    family: dict[int, str] = {}
    try:
        started = [tmp_path / "started-a", tmp_path / "started-b"]
        wait_for(parent, lambda: all(p.exists() for p in started), "children's pid files")
        family = descendants(parent.pid)
        assert {int(p.read_text()) for p in started} <= set(family)
        signum = getattr(signal, how.split()[0])
        (os.killpg if how.endswith("group") else os.kill)(parent.pid, signum)
        status = parent.wait(timeout=GONE_WITHIN)
        stderr = log.read_text()
        assert_gone(family)
        assert not (tmp_path / "started-c").exists()
        expected = {"SIGKILL": -signal.SIGKILL, "SIGTERM": 143}.get(how, 130)
        assert status == expected, stderr
        if signum == signal.SIGINT:
            assert stderr.strip() == "KeyboardInterrupt reached the parent"
    finally:
        kill_all(parent, family)


# ----------------------------------------------------------------------- end to end

SEEDS = (1, 2)
N_TRAIN = 1000
# threads=1: what --jobs 2 gives each worker on two cores, without the FLOP count that
# chooses it (a second and more in every process started)
OVERRIDES = ("epochs.pretrain=1", "epochs.sparsify=1", "epochs.dbb=1", "device=cpu",
             "optim.batch_size=50", "data.download=false", "data.verify=false",
             f"data.limit_train={N_TRAIN}", "threads=1")  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Fashion-MNIST in the real file format: a run's epoch takes a fraction of a
    second, the whole run a few seconds, most of them starting the processes."""
    root = tmp_path_factory.mktemp("data")
    arrays = smallfiles.datafiles.mnist_arrays(N_TRAIN, 200, seed=0, side=28)
    smallfiles.datafiles.write_mnist(root / "fashion-mnist", arrays, gz=True)
    return root


def figures(out: Path) -> dict[int, dict[str, Any]]:
    """Per seed, per stage, the figures that do not depend on timing: error, units,
    active units, and each epoch's losses."""
    found = {}
    for seed in SEEDS:
        result = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        found[seed] = {
            name: [s["error"], s["units"], s.get("active"),
                   [[h.get(k) for k in ("loss", "cross_entropy", "kl", "error")]
                    for h in s.get("history", [])]]
            for name, s in result["stages"].items()
        }  # fmt: skip
    return found


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    """The figures of a run never interrupted (here, one seed after the other: a run's
    figures do not depend on --jobs)."""
    from bbdrop.experiments import reproduce

    out = tmp_path_factory.mktemp("reference")
    reproduce("lenet-500-300-fashion-cpu", SEEDS, out, [*OVERRIDES, f"data.data_dir={data_dir}"],
              figures=False, jobs=1)  # fmt: skip
    return figures(out / "lenet-500-300-fashion-cpu")


def reproduce_command(data_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bbdrop", "reproduce", "lenet-500-300-fashion-cpu",
            "--seeds", ",".join(map(str, SEEDS)), "--jobs", "2", "--no-figures", "--quiet",
            "--out", str(out), *OVERRIDES, f"data.data_dir={data_dir}"]  # fmt: skip


def start(
    data_dir: Path, out: Path, stderr: Any, ready: Callable[[], Any]
) -> subprocess.Popen[Any]:
    """``bbdrop reproduce --jobs 2`` started in its own session, returned once ``ready()``
    (e.g. a new checkpoint in a seed folder: both workers then run, they start
    together)."""
    parent = subprocess.Popen(reproduce_command(data_dir, out), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=stderr, start_new_session=True)  # fmt: skip
    try:
        wait_for(parent, ready, "checkpoint")
    except BaseException:
        kill_all(parent, {})
        raise
    return parent


@pytest.mark.slow
@needs_proc
def test_killed_reproduce_leaves_nothing_running_and_resumes(
    data_dir: Path, reference: dict[int, Any], tmp_path: Path
) -> None:
    """SIGTERM to ``reproduce --jobs 2`` (the parent alone) mid-run: none of its processes
    is alive 10 s later (so no run folder stays locked), its last word is one line, and
    the same command run again (in this process: one start of torch less) resumes and
    ends with the figures of a run never interrupted. (SIGKILL to the parent, whose
    children must then notice on their own, is
    test_children_end_with_their_parent's, with bbdrop.workers' own children; it was
    checked here too, one launch of reproduce more, until the suite needed the time.)"""
    folder = tmp_path / "lenet-500-300-fashion-cpu"
    with open(tmp_path / "stderr", "w") as stderr:
        parent = start(data_dir, tmp_path, stderr, lambda: any(folder.glob("seed-*/*.pt")))
    family: dict[int, str] = {}
    try:
        family = descendants(parent.pid)
        assert len(family) >= 3, family  # two workers and the resource tracker
        os.kill(parent.pid, signal.SIGTERM)
        assert parent.wait(timeout=GONE_WITHIN) == 143
        assert_gone(family)
    finally:
        kill_all(parent, family)
    # a seed is finished once its last stage's checkpoint is written
    unfinished = [s for s in SEEDS if not (folder / f"seed-{s}" / "preprune.pt").exists()]
    assert unfinished, "both seeds finished before the kill: nothing was tested"
    text = (tmp_path / "stderr").read_text()  # one line, no traceback
    assert text.strip().splitlines()[-1].startswith("bbdrop: terminated;"), text
    assert "Traceback" not in text, text
    from bbdrop.cli import main

    assert main(reproduce_command(data_dir, tmp_path)[3:]) == 0  # after python -m bbdrop
    assert figures(folder) == reference


@pytest.mark.slow
@needs_fork
def test_sigint_to_a_run_stops_it_with_one_line(data_dir: Path, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) to ``bbdrop run`` mid-run: exit 130, its last word the CLI's one
    line, no traceback. (What SIGINT does to ``reproduce --jobs 2``'s workers is
    test_children_end_with_their_parent's: the parent meets KeyboardInterrupt and the
    workers end with it; this is the line the CLI then prints. A forked run: no second
    start of torch.)"""
    from bbdrop.cli import main

    out = tmp_path / "run"
    argv = ["run", "lenet-500-300-fashion-cpu", "--out", str(out), "--quiet", *OVERRIDES,
            f"data.data_dir={data_dir}"]  # fmt: skip
    child = forked(main, argv, stderr=tmp_path / "stderr")
    deadline = time.monotonic() + 90
    while child.exitcode is None and not any(out.glob("*.pt")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.exitcode is None, (tmp_path / "stderr").read_text()
    os.kill(child.pid, signal.SIGINT)  # type: ignore[arg-type]
    child.join(GONE_WITHIN)
    text = (tmp_path / "stderr").read_text()
    assert child.exitcode == 130, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("bbdrop: interrupted;"), text
    assert "Traceback" not in text, text
