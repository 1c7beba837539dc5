"""pytest collects the package's doctests (``--doctest-modules``, pyproject.toml) without
the optional extras: no module of src/bbdrop imports them when it is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the extras [plots] and [export] (pyproject.toml); scipy is no extra: scikit-learn needs it
EXTRAS = ("matplotlib", "safetensors", "onnx", "onnxscript", "onnxruntime")


@pytest.mark.slow
def test_the_doctests_are_collected_without_the_optional_extras() -> None:
    # sys.modules[name] = None: ``import name`` raises ImportError, as if it were not installed
    code = (f"import sys\nfor name in {EXTRAS!r}:\n    sys.modules[name] = None\n"
            "import pytest\nsys.exit(pytest.main(sys.argv[1:]))\n")  # fmt: skip
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    argv = [sys.executable, "-c", code, "--collect-only", "-q", "-p", "no:cacheprovider",
            "--doctest-modules", str(ROOT / "src" / "bbdrop")]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "src/bbdrop/__init__.py::bbdrop" in done.stdout, done.stdout
