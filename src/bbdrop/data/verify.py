"""Checking dataset files already on disk against the published checksums, once.

:func:`bbdrop.data.load_dataset` (``verify=True``, the default) checks each file
it is about to read:

* a file under its published name (``train-images-idx3-ubyte.gz``,
  ``cifar-10-python.tar.gz``) must have the published size and SHA-256, or, for a
  ``.gz`` file whose :class:`RemoteFile` knows ``content_sha256``, decompress to
  bytes of that SHA-256: the same data recompressed with another gzip header,
  as Debian ships Fashion-MNIST;
* an alternative file (an uncompressed IDX file) must have the SHA-256
  ``content_sha256`` when it is known. When it is not (MNIST: no source for it
  offline) and for folders (extracted CIFAR), nothing is hashed; the readers'
  own checks (IDX header and sizes; CIFAR pickle layout, shapes and labels)
  are all there is.

Hashing the files on every run would cost seconds (CIFAR's archives are 170 MB),
so each verified file is recorded in ``<user cache>/verified.json``: its absolute
path, size, ``mtime_ns`` and the SHA-256 it matched. While its size and mtime are
unchanged it is not hashed again; a file rewritten since is. The record is only a
cache: when it is unreadable or corrupt it is ignored (and rewritten), and when
the cache cannot be written every file is verified on every run.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import zlib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from bbdrop.data.download import ChecksumError, DatasetNotFoundError, RemoteFile, file_sha256
from bbdrop.data.locations import default_cache_dir
from bbdrop.files import write_atomic

__all__ = ["RECORD_NAME", "VerifiedRecord", "default_record_path", "verify_files"]

RECORD_NAME = "verified.json"
_VERSION = 1
_SKIP_HINT = "verify=False, or data.verify=false in a run's settings, skips this check"


def default_record_path() -> Path:
    """``<user cache>/verified.json``."""
    return default_cache_dir() / RECORD_NAME


class VerifiedRecord:
    """The files verified so far: ``{absolute path: {size, mtime_ns, sha256}}``, read
    from ``path`` (None: remember nothing) and written back by :meth:`save`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries = self._read()
        self._added: dict[str, dict[str, object]] = {}

    def _read(self) -> dict[str, dict[str, object]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
            return {}
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            return {}
        files = data.get("files")
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if isinstance(k, str) and _valid_entry(v)}

    def holds(self, path: Path, stat: os.stat_result, sha256s: Collection[str]) -> bool:
        """Whether ``path``, as ``stat`` describes it now, was verified against one of
        ``sha256s``."""
        entry = self.entries.get(_key(path))
        return (
            entry is not None
            and entry["size"] == stat.st_size
            and entry["mtime_ns"] == stat.st_mtime_ns
            and entry["sha256"] in sha256s
        )

    def add(self, path: Path, stat: os.stat_result, sha256: str) -> None:
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
        self.entries[_key(path)] = self._added[_key(path)] = entry

    def save(self) -> None:
        """Write the record atomically, merged with what other processes wrote since
        it was read; entries of files that no longer exist are dropped. Never fails:
        a cache that cannot be written only means verifying again next time."""
        if self.path is None or not self._added:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = self._read() | self._added
            files = {k: v for k, v in sorted(merged.items()) if os.path.exists(k)}
            blob = json.dumps({"version": _VERSION, "files": files}, indent=1) + "\n"
            write_atomic(self.path, blob.encode())


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _valid_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and all(type(entry.get(k)) is int for k in ("size", "mtime_ns"))
        and isinstance(entry.get("sha256"), str)
    )


def verify_files(
    files: Sequence[RemoteFile],
    paths: Mapping[str, Path],
    *,
    trusted: Collection[Path] = (),
    record: Path | None = None,
) -> None:
    """Check each of ``files`` at ``paths[file.name]`` (the file or an alternative)
    as the module docstring says, hashing only what ``record`` does not vouch for.

    ``trusted`` paths were verified while downloading and are only recorded.
    Raises :class:`ChecksumError` naming the first file that is not the published
    one, the SHA-256 expected and found, and what to do.
    """
    verified = VerifiedRecord(record)
    try:
        for remote in files:
            path = Path(paths[remote.name])
            _verify_one(remote, path, verified, trusted=path in trusted)
    finally:
        verified.save()  # what was verified before a failure stays verified


def _verify_one(remote: RemoteFile, path: Path, verified: VerifiedRecord, *, trusted: bool) -> None:
    published = path.name == remote.name
    if published:
        accepted = {remote.sha256}
        if remote.content_sha256 is not None and remote.name.endswith(".gz"):
            accepted.add(remote.content_sha256)
    elif remote.content_sha256 is not None and not path.is_dir():
        accepted = {remote.content_sha256}
    else:
        return  # an extracted folder, or an unpacked file of unknown content hash
    if not path.is_file():
        raise ChecksumError(
            f"{path}: not a regular file; delete it to download {remote.name} again, "
            f"or replace it with the published file"
        )
    try:
        stat = path.stat()
        if verified.holds(path, stat, accepted):
            return
        if trusted:
            verified.add(path, stat, remote.sha256)
            return
        matched = (
            _check_published(remote, path, stat) if published else _check_unpacked(remote, path)
        )
    except OSError as err:
        if isinstance(err, ChecksumError):
            raise
        raise DatasetNotFoundError(
            f"{path}: could not be read to verify it ({err.strerror or err}); fix its "
            f"permissions, or delete it to download {remote.name} again"
        ) from err
    verified.add(path, stat, matched)


def _check_published(remote: RemoteFile, path: Path, stat: os.stat_result) -> str:
    """The accepted SHA-256 that ``path`` (under the published name) matches."""
    actual = None
    if remote.size is None or stat.st_size == remote.size:
        actual = file_sha256(path)
        if actual == remote.sha256:
            return remote.sha256
    content_tried = remote.content_sha256 is not None and remote.name.endswith(".gz")
    if content_tried:
        try:
            content = file_sha256(path, gunzip=True)
        except (gzip.BadGzipFile, EOFError, zlib.error):
            content = None
        if content == remote.content_sha256:
            return remote.content_sha256
    if actual is None:
        actual = file_sha256(path)
    size = ""
    if remote.size is not None and stat.st_size != remote.size:
        size = f"; size {stat.st_size} bytes, expected {remote.size}"
    unpacked = "; its unpacked content is not the published data either" if content_tried else ""
    raise ChecksumError(
        f"{path}: not the published {remote.name}: SHA-256 {actual}, expected "
        f"{remote.sha256}{size}{unpacked}; delete it to download it again, or replace it "
        f"with the published file ({_SKIP_HINT})"
    )


def _check_unpacked(remote: RemoteFile, path: Path) -> str:
    """``remote.content_sha256`` if ``path`` (an uncompressed alternative) has it."""
    actual = file_sha256(path)
    if actual == remote.content_sha256:
        return actual
    raise ChecksumError(
        f"{path}: not the unpacked content of the published {remote.name}: SHA-256 "
        f"{actual}, expected {remote.content_sha256}; delete it to use or download "
        f"{remote.name} instead, or replace it with the published data ({_SKIP_HINT})"
    )
