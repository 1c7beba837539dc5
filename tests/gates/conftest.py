"""Every gate test runs with both implementations of the training-time masks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bbdrop import kernels


def compiled_available() -> bool:
    try:
        kernels.load()
    except RuntimeError:
        return False
    return True


@pytest.fixture(autouse=True, params=["torch", "compiled"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "compiled" and not compiled_available():
        pytest.skip("bbdrop's compiled kernels do not build here (no C++ compiler?)")
    before = kernels.get_backend()
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(before)
