"""Choosing between the compiled kernels and the eager implementation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bbdrop import kernels


def test_backend_names_are_checked() -> None:
    with pytest.raises(ValueError, match="auto, compiled, torch"):
        kernels.set_backend("fast")


def test_the_environment_variable_is_checked() -> None:
    env = {**os.environ, "BBDROP_KERNELS": "fast"}
    done = subprocess.run(
        [sys.executable, "-c", "import bbdrop"], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "BBDROP_KERNELS environment variable must be one of auto, compiled, torch" in (
        done.stderr
    )


def test_the_environment_variable_sets_the_backend() -> None:
    env = {**os.environ, "BBDROP_KERNELS": "torch"}
    code = "import bbdrop, torch; print(bbdrop.kernels.get_backend(), bbdrop.kernels.resolved())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["torch", "torch"]
