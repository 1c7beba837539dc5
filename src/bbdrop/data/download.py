"""Fetching dataset files: mirrors in order, size and SHA-256 checked, atomic placement.

A download is written to a hidden temporary file in the target folder,
``.<name>.<pid>.<hex>.part``, hashed while it streams, flushed to disk
(``fsync``) and renamed onto its final name (``os.replace``) only once its size
and SHA-256 match the published ones; the folder is then synced too, where the
OS allows it, so that the rename survives a power cut. On any failure the
temporary file is removed, so the folder holds either the verified file or
nothing new. A process killed outright (``kill -9``) cannot clean up: the next
download of the same file into that folder removes the parts left by processes
that no longer exist (never those of a live process).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bbdrop.files import atomic_file

__all__ = [
    "ChecksumError",
    "DatasetNotFoundError",
    "RemoteFile",
    "download_file",
    "file_sha256",
    "file_url",
]

_CHUNK = 1 << 20
_USER_AGENT = "bbdrop (python urllib)"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DatasetNotFoundError(OSError):
    """A dataset's files are not on disk and could not be downloaded.

    The message names the folders searched, the folder to place the files in,
    the exact file names and where they are published.
    """


class ChecksumError(DatasetNotFoundError):
    """A file's size or SHA-256 is not the published one: either a download, which was
    discarded with nothing left behind, or a file already on disk, which is left as it
    is and named in the message with what to do about it."""


@dataclass(frozen=True)
class RemoteFile:
    """A file as published: its name on the mirrors, SHA-256 and size in bytes.

    ``alternatives`` are local names accepted in its place (an uncompressed copy,
    an extracted folder); they are never downloaded. ``content_sha256``, when
    known, is the SHA-256 of the file's decompressed bytes (a ``.gz`` file's
    content): a recompressed copy of the same data (another gzip header) and an
    uncompressed alternative file are checked against it.
    """

    name: str
    sha256: str
    size: int | None = None
    alternatives: tuple[str, ...] = ()
    content_sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name must be a plain file name, got {self.name!r}")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.content_sha256 is not None and not _SHA256.fullmatch(self.content_sha256):
            raise ValueError(
                f"content_sha256 must be 64 lowercase hex digits or None, "
                f"got {self.content_sha256!r}"
            )
        if self.size is not None and (isinstance(self.size, bool) or self.size < 0):
            raise ValueError(f"size must be a byte count >= 0 or None, got {self.size!r}")


def file_sha256(path: str | os.PathLike[str], *, gunzip: bool = False) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks; with ``gunzip``, of its
    decompressed content (OSError, EOFError or zlib.error for a corrupt stream)."""
    digest = hashlib.sha256()
    with open(path, "rb") as raw, gzip.open(raw, "rb") if gunzip else raw as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    remote: RemoteFile,
    mirrors: Sequence[str],
    directory: str | os.PathLike[str],
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``remote`` into ``directory`` from the first mirror that serves it intact.

    Each mirror is a base URL; the file's URL is ``<mirror>/<name>``. Raises
    :class:`ChecksumError` when some mirror served wrong bytes and none served the
    right ones, :class:`DatasetNotFoundError` when none could be reached; the
    message's first line says which and what to do, the next ones list every URL
    tried and why it failed. ``directory`` must exist. Parts of earlier downloads
    of this file into ``directory`` left by dead processes are removed first.
    """
    if not mirrors:
        raise ValueError(f"no mirror to download {remote.name!r} from")
    directory = Path(directory)
    failures: list[str] = []
    reasons: list[str] = []  # why each mirror that did not serve wrong bytes failed
    corrupt = False
    for mirror in mirrors:
        url = file_url(mirror, remote.name)
        try:
            return _fetch_verified(url, remote, directory, progress=progress, timeout=timeout)
        except _MismatchError as err:
            corrupt = True
            failures.append(f"{url}: {err}")
        except (OSError, http.client.HTTPException, ValueError) as err:
            failures.append(f"{url}: {_describe(err)}")
            reasons.append(_kind(err))
    if corrupt:
        headline = (
            f"could not download {remote.name} into {directory}: the mirrors served wrong "
            "bytes (not the published size or SHA-256) and nothing was kept; try again "
            "later, or place the published file there yourself"
        )
        raise ChecksumError("\n  ".join([headline, *failures]))
    why = " / ".join(dict.fromkeys(reasons))  # each kind once, in order
    headline = (
        f"could not download {remote.name} into {directory}: {why} (below); check the "
        "network connection and the mirrors, or place the published file there yourself"
    )
    raise DatasetNotFoundError("\n  ".join([headline, *failures]))


def file_url(mirror: str, name: str) -> str:
    """``<mirror>/<name>`` with exactly one slash between them."""
    return mirror.rstrip("/") + "/" + name


class _MismatchError(Exception):
    pass


def _fetch_verified(
    url: str, remote: RemoteFile, directory: Path, *, progress: bool, timeout: float
) -> Path:
    final = directory / remote.name
    digest = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with (
        atomic_file(final) as out,  # renamed onto final only if every check below passes
        urllib.request.urlopen(request, timeout=timeout) as response,
        tqdm(
            total=remote.size or getattr(response, "length", None),
            desc=remote.name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        announced = getattr(response, "length", None)  # Content-Length, if sent
        while chunk := response.read(_CHUNK):
            received += len(chunk)
            if remote.size is not None and received > remote.size:
                raise _MismatchError(f"more than the published {remote.size} bytes")
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
        if announced is not None and received < announced:
            raise ConnectionError(f"connection closed after {received} of {announced} bytes")
        if remote.size is not None and received != remote.size:
            raise _MismatchError(f"got {received} bytes, published size is {remote.size}")
        if digest.hexdigest() != remote.sha256:
            raise _MismatchError(
                f"SHA-256 mismatch: got {digest.hexdigest()}, expected {remote.sha256}"
            )
    return final


def _kind(err: BaseException) -> str:
    """A few words on why a mirror failed, for the message's first line."""
    if isinstance(err, urllib.error.HTTPError):
        return f"the mirror answered HTTP {err.code}"
    if isinstance(err, urllib.error.URLError):
        return "no mirror could be reached"
    if isinstance(err, TimeoutError):
        return "the mirror did not answer in time"
    return "the connection broke off"


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"{err.reason}"
    return f"{type(err).__name__}: {err}"
