"""Where dataset files are looked for.

A root is a folder holding one subfolder per dataset (``<root>/mnist``,
``<root>/cifar10``, ...).

* A folder named by the caller (``load_dataset(name, data_dir=X)``, the
  ``data.data_dir`` setting) is the only root: ``X/<name>`` is used when it is
  complete, missing files are downloaded into it (or refused with
  ``download=False``), and ``X`` or ``X/<name>`` existing as something other
  than a folder is an error. No other folder is ever read in its place, so the
  folder a run's configuration records is the one its data came from.
* Otherwise these roots are searched, in order:

  1. the ``BBDROP_DATA`` environment variable, when set and not empty;
  2. the user cache, ``$XDG_CACHE_HOME/bbdrop`` or ``~/.cache/bbdrop``;
  3. the system folder ``/usr/share/datasets`` (Debian's
     ``dataset-fashion-mnist`` installs the four gzipped IDX files, under their
     published names, in ``/usr/share/datasets/fashion-mnist``). The
     ``system_dir`` argument names another (``None``: none); without it,
     ``BBDROP_SYSTEM_DATA`` does when set, and set to the empty string leaves the
     system folder out (:func:`default_system_dir`), in subprocesses too: the
     tests use it to search only the folders they write.

  The first ``<root>/<name>`` holding every file is used; one holding only some
  is passed over (a cache may be partial), while a root or dataset folder that
  exists but is not a folder is an error. When none is complete, downloads go to
  the first root's folder, never the system one.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Final, NamedTuple

__all__ = [
    "DATA_ENV_VAR",
    "DEFAULT_SYSTEM_DIR",
    "SYSTEM_DATA_DIR",
    "SYSTEM_ENV_VAR",
    "SearchRoot",
    "default_cache_dir",
    "default_system_dir",
    "search_roots",
]

DATA_ENV_VAR = "BBDROP_DATA"
SYSTEM_ENV_VAR = "BBDROP_SYSTEM_DATA"
SYSTEM_DATA_DIR = Path("/usr/share/datasets")


class _Default(enum.Enum):
    SYSTEM_DIR = "default_system_dir()"

    def __repr__(self) -> str:  # as it reads in help(load_dataset)
        return "DEFAULT_SYSTEM_DIR"


DEFAULT_SYSTEM_DIR: Final = _Default.SYSTEM_DIR
"""The ``system_dir`` default: :func:`default_system_dir`, looked up at each call."""


class SearchRoot(NamedTuple):
    """A folder searched for datasets and why it is searched."""

    path: Path
    origin: str


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bbdrop``, or ``~/.cache/bbdrop`` when that is unset or relative
    (the XDG base directory specification says to ignore a relative path)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "bbdrop"


def default_system_dir() -> Path | None:
    """The system folder searched last when the caller names none: ``/usr/share/datasets``,
    or ``$BBDROP_SYSTEM_DATA`` when that is set; set to the empty string, None (no
    system folder is searched)."""
    env = os.environ.get(SYSTEM_ENV_VAR)
    if env is None:
        return SYSTEM_DATA_DIR
    return Path(env).expanduser() if env else None


def search_roots(
    data_dir: str | os.PathLike[str] | None = None,
    system_dir: str | os.PathLike[str] | _Default | None = DEFAULT_SYSTEM_DIR,
) -> list[SearchRoot]:
    """The roots searched, in order: ``data_dir`` alone when it is given; otherwise
    ``$BBDROP_DATA``, the user cache and ``system_dir`` (``None`` leaves it out; by
    default :func:`default_system_dir`)."""
    if data_dir is not None:
        return [SearchRoot(Path(data_dir).expanduser(), "data_dir argument")]
    if system_dir is DEFAULT_SYSTEM_DIR:
        system_dir = default_system_dir()
    roots = []
    env = os.environ.get(DATA_ENV_VAR, "")
    if env:
        roots.append(SearchRoot(Path(env).expanduser(), f"${DATA_ENV_VAR}"))
    roots.append(SearchRoot(default_cache_dir(), "user cache"))
    if system_dir is not None:
        roots.append(SearchRoot(Path(system_dir), "system datasets"))
    return roots
