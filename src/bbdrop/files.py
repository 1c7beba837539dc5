"""Files that are never half-written: write to a temporary name, flush, rename.

Every file bbdrop writes (checkpoints, results, configurations, downloads,
verification records) goes through :func:`atomic_file`: the bytes go to a
hidden temporary file in the destination's folder,
``.<name>.<pid>.<8 hex digits>.part``, are flushed to disk (``fsync``), and
the temporary file is renamed onto the destination (``os.replace``, atomic on
POSIX and Windows); the folder is then synced where the OS allows it, so that
the rename survives a power cut. A run killed at any moment leaves the old file
or the new one, never a torn one. A process killed outright (``kill -9``)
cannot remove its temporary file: the next write of the same file removes the
parts left by processes that no longer exist (never those of a live process).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_file",
    "check_writable",
    "fsync_directory",
    "json_bytes",
    "part_name",
    "remove_stale_parts",
    "write_atomic",
    "write_together",
]


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file whose contents replace ``path`` when the block ends without an
    error; on an error (or KeyboardInterrupt) ``path`` is left as it was and the
    temporary file is removed."""
    path = Path(path)
    tmp, fd = _new_part(path)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def _new_part(path: Path) -> tuple[Path, int]:
    """A fresh temporary file beside ``path``, opened for writing (its name and file
    descriptor), after removing the parts that dead processes left for ``path``."""
    remove_stale_parts(path.parent, path.name)
    tmp = path.parent / part_name(path.name)
    # O_EXCL: never follow or reuse an existing path; 0o666 leaves the mode to the umask.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return tmp, fd


def json_bytes(obj: object) -> bytes:
    """``obj`` as the JSON records bbdrop writes (results.json, summary.json,
    sweep.json): indented by 2, one final newline, UTF-8."""
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing (:func:`atomic_file`)."""
    with atomic_file(path) as out:
        out.write(data)


def check_writable(path: Path) -> None:
    """ValueError unless :func:`write_atomic` can create or replace ``path``: it is a
    regular file or nothing, and the nearest existing folder above it is a folder."""
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a regular file; remove it or choose "
                         "another folder")  # fmt: skip
    existing = next(p for p in path.parents if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ValueError(f"cannot write {path}: {existing} is a file, not a folder; choose "
                         "another folder")  # fmt: skip


def write_together(files: dict[Path, bytes]) -> None:
    """Write several files all or none: every temporary file is written, flushed and
    synced before the first is renamed onto its name, so a folder that cannot be
    written (or a full disk) leaves every destination as it was. A failure is one
    ValueError naming the destination, not its temporary name. Under torchrun, process 0
    writes and the others wait (docs/distributed.md)."""
    from bbdrop.distributed import main_only  # torch: not for the modules that avoid it

    main_only(lambda: _write_together(files))


def _write_together(files: dict[Path, bytes]) -> None:
    parts: list[tuple[Path, Path]] = []
    path = next(iter(files), Path())
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp, fd = _new_part(path)
            parts.append((tmp, path))
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        for tmp, path in parts:
            os.replace(tmp, path)
    except OSError as err:
        for tmp, _ in parts:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise ValueError(f"cannot write {path}: {err.strerror or err}; choose another "
                         "path") from None  # fmt: skip
    for folder in dict.fromkeys(p.parent for p in files):
        fsync_directory(folder)


def part_name(name: str, pid: int | None = None) -> str:
    """A fresh temporary name for a download of ``name`` by process ``pid``
    (default: this one): ``.<name>.<pid>.<8 hex digits>.part``."""
    pid = os.getpid() if pid is None else pid
    return f".{name}.{pid}.{secrets.token_hex(4)}.part"


def remove_stale_parts(directory: str | os.PathLike[str], name: str) -> list[Path]:
    """Remove the temporary parts of downloads of ``name`` in ``directory`` whose
    process no longer exists (a download killed with SIGKILL or a power cut); the
    parts removed. The part of a live process, this one included, is never touched;
    where a process cannot be probed (Windows) nothing is removed."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[0-9a-f]+\.part")
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` may be a live process: only a definite "no such process"
    counts as dead."""
    if pid == os.getpid():
        return True
    if os.name == "nt" or pid <= 0:  # os.kill(pid, 0) would signal on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # someone else's process, or a pid we cannot probe
    return True


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the OS supports
    opening and syncing folders (POSIX); silently nothing elsewhere."""
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:
        return
    try:
        fd = os.open(directory, os.O_RDONLY | flag)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
