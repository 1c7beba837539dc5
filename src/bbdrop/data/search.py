"""Finding a dataset's files on disk, fetching the missing ones, and saying what to do
when neither works.

:func:`locate_files` looks for the files of a :class:`~bbdrop.data.registry.DatasetSpec`
under the search roots of :mod:`bbdrop.data.locations` (:func:`find_dataset_dir`),
downloads what is missing (:func:`~bbdrop.data.download.download_file`) and checks
the files that were already there (:mod:`bbdrop.data.verify`). A
:class:`~bbdrop.data.download.DatasetNotFoundError` raised here names, on its first
line, the folder or file and what to do; the next lines list the folders searched,
what each held, the files to place with their sizes and SHA-256s, and their URLs
(docs/data.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from pathlib import Path

from bbdrop.data.download import DatasetNotFoundError, RemoteFile, download_file, file_url
from bbdrop.data.locations import DATA_ENV_VAR, SearchRoot, _Default, search_roots
from bbdrop.data.registry import DatasetSpec
from bbdrop.data.verify import default_record_path, verify_files

__all__ = ["find_dataset_dir", "locate_files"]


def locate_files(
    spec: DatasetSpec,
    data_dir: str | os.PathLike[str] | None,
    system_dir: str | os.PathLike[str] | _Default | None,
    *,
    download: bool,
    progress: bool,
    timeout: float,
    verify: bool,
) -> tuple[Path, dict[str, Path]]:
    """The folder that holds every file of ``spec``, once the missing ones are
    downloaded into the first root's folder when no folder does, and the local path
    of each file by its published name; the arguments are those of
    :func:`~bbdrop.data.load_dataset`. With ``verify``, files that were already on
    disk are checked against their published SHA-256 (:mod:`bbdrop.data.verify`)."""
    fetch = functools.partial(_fetch, spec, download=download, progress=progress, timeout=timeout)
    downloaded: list[Path] = []
    if data_dir is not None:
        roots = search_roots(data_dir)  # the named folder, alone
    else:
        roots = search_roots(None, system_dir)
    location = find_dataset_dir(spec, roots)
    if location is None:
        location = roots[0].path / spec.subdir
        downloaded = fetch(roots, location, explicit=data_dir is not None)
    paths = _resolve(spec, location)
    if verify:
        verify_files(spec.files, paths, trusted=downloaded, record=default_record_path())
    return location, paths


def find_dataset_dir(spec: DatasetSpec, roots: Sequence[SearchRoot]) -> Path | None:
    """The first ``<root>/<subdir>`` that holds every file of ``spec``, or None.

    A folder that holds only some of them is passed over. A root, or a root's
    ``<subdir>``, that exists but is not a folder raises
    :class:`DatasetNotFoundError` when the search reaches it.
    """
    for root in roots:
        if root.path.exists() and not root.path.is_dir():
            raise DatasetNotFoundError(
                f"{_describe_root(root)} {root.path} is not a folder; {_root_fix(root, spec)}"
            )
        folder = root.path / spec.subdir
        if folder.exists() and not folder.is_dir():
            raise DatasetNotFoundError(
                f"dataset {spec.name!r}: {folder} ({root.origin}) is not a folder; remove or "
                f"rename it, the dataset's files go in a folder of that name"
            )
        if folder.is_dir() and all(_local_path(folder, f) is not None for f in spec.files):
            return folder
    return None


def _describe_root(root: SearchRoot) -> str:
    return {
        "data_dir argument": "data_dir",
        f"${DATA_ENV_VAR}": f"${DATA_ENV_VAR}",
        "user cache": "the user cache",
        "system datasets": "system_dir",
    }.get(root.origin, root.origin)


def _root_fix(root: SearchRoot, spec: DatasetSpec) -> str:
    return {
        "data_dir argument": (
            f"give the folder that holds (or will hold) {spec.subdir}/, not a file"
        ),
        f"${DATA_ENV_VAR}": f"point ${DATA_ENV_VAR} at a folder, or unset it",
        "user cache": "remove or rename that file, or set $XDG_CACHE_HOME to another folder",
        "system datasets": "remove or rename that file, or pass system_dir=None",
    }.get(root.origin, "remove or rename that file")


def _resolve(spec: DatasetSpec, folder: Path) -> dict[str, Path]:
    paths = {}
    for f in spec.files:
        path = _local_path(folder, f)
        if path is None:  # only if the folder changed under our feet
            raise DatasetNotFoundError(
                f"dataset {spec.name!r}: {folder / f.name} disappeared while loading; "
                f"run again once nothing else is changing {folder}"
            )
        paths[f.name] = path
    return paths


def _local_path(folder: Path, remote: RemoteFile) -> Path | None:
    # Alternatives (uncompressed, extracted) first: they are faster to read.
    for name in (*remote.alternatives, remote.name):
        if (folder / name).exists():
            return folder / name
    return None


def _fetch(
    spec: DatasetSpec,
    roots: Sequence[SearchRoot],
    target: Path,
    *,
    explicit: bool,
    download: bool,
    progress: bool,
    timeout: float,
) -> list[Path]:
    """Download the files missing from ``target`` into it (creating it); the paths
    downloaded. ``explicit``: ``target`` is the folder the caller named."""
    missing = [f for f in spec.files if _local_path(target, f) is None]
    if not download:
        headline = _no_download_headline(roots, target, missing, explicit=explicit)
        raise DatasetNotFoundError(_not_found_message(spec, roots, target, headline))
    try:
        created = _make_dirs(target)
    except OSError as err:
        headline = (
            f"could not create {target} ({err.strerror or err}); place the files below there "
            f"yourself, or choose a folder that can be written (data_dir, ${DATA_ENV_VAR})"
        )
        raise DatasetNotFoundError(_not_found_message(spec, roots, target, headline)) from err
    downloaded = []
    try:
        for remote in missing:
            downloaded.append(
                download_file(remote, spec.mirrors, target, progress=progress, timeout=timeout)
            )
    except BaseException as err:
        for folder in reversed(created):  # leave no empty folder of ours behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, DatasetNotFoundError):
            headline, *details = str(err).splitlines()
            message = _not_found_message(spec, roots, target, headline, details)
            raise type(err)(message) from err
        raise
    return downloaded


def _no_download_headline(
    roots: Sequence[SearchRoot], target: Path, missing: Sequence[RemoteFile], *, explicit: bool
) -> str:
    """The first line of the error when files are missing and ``download=False``."""
    allow = "or allow downloads (download=True; data.download=true in a run's settings)"
    if explicit and not target.exists():
        headline = (
            f"no folder {target}, and download=False; create it with the files below, {allow}"
        )
    elif explicit:
        names = ", ".join(f.name for f in missing)
        headline = (
            f"{target} lacks {names}, and download=False; place them there (see below), {allow}"
        )
    else:
        headline = (
            f"no complete copy in the {len(roots)} folder{'s' * (len(roots) != 1)} searched, "
            "and download=False; "
            f"place the files below in {target}, {allow}"
        )
    return headline


def _make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p folder``; the folders it created, outermost first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _not_found_message(
    spec: DatasetSpec,
    roots: Sequence[SearchRoot],
    target: Path,
    headline: str,
    details: Sequence[str] = (),
) -> str:
    """``dataset '<name>': <headline>`` on the first line; then ``details`` (one
    line per URL tried), the folders searched and what each held, the files to
    place in ``target`` with their sizes and SHA-256s, and their URLs."""
    width = max(len(f.name) for f in spec.files)
    lines = [f"dataset {spec.name!r}: {headline.strip()}"]
    lines += [f"  {line.strip()}" for line in details]
    lines.append("Searched, in order:" if len(roots) > 1 else "Searched:")
    for root in roots:
        folder = root.path / spec.subdir
        lines.append(f"  {folder}  ({root.origin}: {_folder_status(spec, folder)})")
    lines.append(f"To use it offline, place these files in {target}:")
    for f in spec.files:
        size = f"{f.size} bytes, " if f.size is not None else ""
        also = f"; or its unpacked form {', '.join(f.alternatives)}" if f.alternatives else ""
        lines.append(f"  {f.name:<{width}}  ({size}sha256 {f.sha256}{also})")
    lines.append("They are published at:")
    lines += [f"  {file_url(m, f.name)}" for f in spec.files for m in spec.mirrors]
    if spec.source:
        lines.append(f"Source: {spec.source}")
    return "\n".join(lines)


def _folder_status(spec: DatasetSpec, folder: Path) -> str:
    if not folder.is_dir():
        return "no folder"
    have = sum(_local_path(folder, f) is not None for f in spec.files)
    return f"{have} of {len(spec.files)} files"
