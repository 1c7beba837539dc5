"""The README's Python example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    probs = namespace["probs"]
    assert isinstance(probs, torch.Tensor) and probs.shape == (200, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(200))
