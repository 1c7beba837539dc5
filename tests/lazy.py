"""A module imported on first use: ``stats = lazy.module("scipy.stats")``. scipy takes 2 s
to import on these cores, and every pytest worker imports every test file to collect
it; the worker that runs the file's tests pays it once."""

from __future__ import annotations

import importlib
from typing import Any


class module:  # lower case: it stands for a module
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)
