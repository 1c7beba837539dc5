"""The scales of a sweep: the folder name of a scale, a configuration with its
regulariser weight scaled, and the selection rule that chooses one scale from a
sweep's points."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bbdrop import validate
from bbdrop.config import RunConfig, apply_overrides

# The selection rule, fixed before any test run (docs/baselines.md, "Tuning"): the
# scale with the highest median validation FLOP speedup whose median validation
# error is at most the dense network's median validation error plus this margin.
SELECTION_MARGIN = 0.5  # percentage points


def scale_name(scale: float) -> str:
    """The folder of a sweep's scale: ``x`` and the value, as short as ``{:g}`` where that
    keeps it exactly (``x0.3``, ``x10``), else every digit (``x1.0000001``)."""
    short = f"{scale:g}"
    return f"x{short}" if float(short) == scale else f"x{float(scale)!r}"


def _check_scales(scales: Sequence[float]) -> None:
    """ValueError unless ``scales`` are distinct finite numbers > 0."""
    if (
        isinstance(scales, (str, bytes))
        or not scales
        or not all(validate.is_number(x) and x > 0 for x in scales)
    ):
        raise ValueError(f"scales must be finite numbers > 0, got {scales!r}")
    if len({float(x) for x in scales}) != len(scales):
        raise ValueError(f"scales repeat: {', '.join(map(repr, scales))}; give each scale once")


def _scaled(cfg: RunConfig, method: str, scale: float) -> RunConfig:
    """``cfg`` with its regulariser weight multiplied by ``scale``."""
    g = cfg.gate
    if method == "dbb":
        return apply_overrides(cfg, [f"gate.dbb_kl_scale={g.dbb_kl_scale * scale!r}"])
    changes = [f"gate.kl_scale={g.kl_scale * scale!r}"]
    if g.conv_kl_scale is not None:
        changes.append(f"gate.conv_kl_scale={g.conv_kl_scale * scale!r}")
    changes += [f"gate.layer_kl_scale.{n}={v * scale!r}" for n, v in g.layer_kl_scale.items()]
    return apply_overrides(cfg, changes)


def select_scale(points: Sequence[dict[str, Any]]) -> float:
    """The scale the selection rule chooses from a sweep's points (medians over seeds);
    when no scale is within the margin, the one with the lowest median error."""
    by_scale: dict[float, list[dict[str, Any]]] = {}
    for p in points:
        by_scale.setdefault(p["scale"], []).append(p)
    med = {x: {k: statistics.median(p[k] for p in ps) for k in ("error", "speedup", "dense_error")}
           for x, ps in by_scale.items()}  # fmt: skip
    allowed = [x for x, m in med.items() if m["error"] <= m["dense_error"] + SELECTION_MARGIN]
    if allowed:
        return max(allowed, key=lambda x: (med[x]["speedup"], -med[x]["error"]))
    return min(med, key=lambda x: med[x]["error"])
