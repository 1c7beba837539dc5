from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the real user cache or $BBDROP_DATA: the cache root
    is a fresh folder under tmp_path, returned for tests that place files there.
    $BBDROP_SYSTEM_DATA is unset: a test that names no system_dir gets the default."""
    monkeypatch.delenv("BBDROP_DATA", raising=False)
    monkeypatch.delenv("BBDROP_SYSTEM_DATA", raising=False)
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache / "bbdrop"
