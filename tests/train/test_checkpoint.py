"""Checkpoints are atomic: a failure while writing leaves the previous one intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bbdrop.train import checkpoint as ck
from bbdrop.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip(tmp_path: Path) -> None:
    state = {
        "epoch": 3,
        "model": {"w": torch.arange(4.0)},
        "rng": torch.get_rng_state(),
        "history": [{"error": 1.5}],
    }
    path = save_checkpoint(state, tmp_path / "sub" / "bb.pt")
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and back["history"] == [{"error": 1.5}]
    assert torch.equal(back["model"]["w"], torch.arange(4.0))
    assert torch.equal(back["rng"], state["rng"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["bb.pt"]  # no temp files left


def test_a_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bb.pt"
    save_checkpoint({"epoch": 1}, path)

    def crash(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # the run is killed mid-write

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["bb.pt"]


def test_missing_foreign_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"epoch": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a bbdrop checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "torn.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="is corrupt or was not written by bbdrop"):
        load_checkpoint(tmp_path / "torn.pt")


def test_the_temporary_file_of_a_killed_save_is_removed_by_the_next(tmp_path: Path) -> None:
    """kill -9 during a save leaves ``.bb.last.pt.<pid>.<hex>.part``; the next save of
    that checkpoint removes it (its process is gone), and never a live process's."""
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    dead = tmp_path / f".bb.last.pt.{child.pid}.0badc0de.part"
    live = tmp_path / f".bb.last.pt.{os.getpid()}.0badc0de.part"
    for part in (dead, live):
        part.write_bytes(b"half a checkpoint")
    save_checkpoint({"epoch": 3}, tmp_path / "bb.last.pt")
    assert not dead.exists() and live.exists()
    assert load_checkpoint(tmp_path / "bb.last.pt")["epoch"] == 3


def test_ctrl_c_while_torch_writes_is_an_interrupt_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C inside torch.save makes torch's zip writer fail as it closes (a RuntimeError
    whose context is the KeyboardInterrupt; seen in a run interrupted mid-checkpoint):
    the caller gets the interrupt, the CLI's one line, and no file is left."""

    def failed(obj: object, f: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")

    def interrupted_in_context(obj: object, f: object) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")  # noqa: B904

    monkeypatch.setattr(torch, "save", interrupted_in_context)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"x": 1}, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch, "save", failed)  # a RuntimeError of its own stays one
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint({"x": 1}, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []
