"""Where dataset files are looked for, in order.

1. the ``data_dir`` argument;
2. the ``BBDROP_DATA`` environment variable;
3. the user cache, ``$XDG_CACHE_HOME/bbdrop`` or ``~/.cache/bbdrop``;
4. the system folder ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist``
   installs the four gzipped IDX files, under their published names, in
   ``/usr/share/datasets/fashion-mnist``).

Each is a root holding one subfolder per dataset (``<root>/mnist``,
``<root>/cifar10``, ...). Downloads go to the first root, never the system one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

__all__ = ["DATA_ENV_VAR", "SYSTEM_DATA_DIR", "SearchRoot", "default_cache_dir", "search_roots"]

DATA_ENV_VAR = "BBDROP_DATA"
SYSTEM_DATA_DIR = Path("/usr/share/datasets")


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


def search_roots(
    data_dir: str | os.PathLike[str] | None = None,
    system_dir: str | os.PathLike[str] | None = SYSTEM_DATA_DIR,
) -> list[SearchRoot]:
    """The roots searched, in order; ``system_dir=None`` leaves out the system folder."""
    roots = []
    if data_dir is not None:
        roots.append(SearchRoot(Path(data_dir).expanduser(), "data_dir argument"))
    env = os.environ.get(DATA_ENV_VAR, "")
    if env:
        roots.append(SearchRoot(Path(env).expanduser(), f"${DATA_ENV_VAR}"))
    roots.append(SearchRoot(default_cache_dir(), "user cache"))
    if system_dir is not None:
        roots.append(SearchRoot(Path(system_dir), "system datasets"))
    return roots
