"""The README's Python example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The training example, then the compaction example on its network (in a temporary
    folder: it writes files)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2, "README should have the training and the compaction example"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    probs = namespace["probs"]
    assert isinstance(probs, torch.Tensor) and probs.shape == (200, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(200))
    exec(compile(blocks[1], str(README), "exec"), namespace)
    net, small, same = (namespace[k] for k in ("net", "small", "same"))
    x = namespace["x_test"]
    with torch.no_grad():
        for other in (small, same):
            torch.testing.assert_close(other(x), net(x), rtol=0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.safetensors"]
