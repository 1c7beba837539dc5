"""Figure computations against hand calculation, and figures that render to files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bbdrop import plots


def test_class_average_masks_by_hand() -> None:
    masks = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    avg = plots.class_average_masks(masks, labels, 2)
    torch.testing.assert_close(avg, torch.tensor([[0.75, 0.25], [0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"no example of class\(es\) \[2\]"):
        plots.class_average_masks(masks, labels, 3)
    with pytest.raises(ValueError, match="masks must be"):
        plots.class_average_masks(masks[0], labels, 2)


def test_class_correlations_match_numpy_and_drop_constant_units() -> None:
    g = torch.Generator().manual_seed(0)
    avg = torch.rand(4, 6, generator=g, dtype=torch.float64)
    avg[:, 2] = 0.7  # constant over classes: no information, left out
    corr = plots.class_correlations(avg)
    expected = np.corrcoef(np.delete(avg.numpy(), 2, axis=1))
    np.testing.assert_allclose(corr.numpy(), expected, rtol=1e-12)
    assert torch.isnan(plots.class_correlations(torch.ones(3, 4))).all()


@pytest.mark.slow
def test_figures_render(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 10
    masks = {"0": torch.rand(30, 784, generator=g), "2": torch.rand(30, 50, generator=g)}
    avg = plots.class_average_masks(masks["0"], labels, 10)
    history = {
        "pretrain": [{"epoch": 1, "error": 9.0, "kl": 0.0, "units": {"0": 784}, "active": {}}],
        "dbb": [
            {
                "epoch": e,
                "error": 8.0,
                "kl": 100.0 / e,
                "units": {"0": 500},
                "active": {"0": 300.0 - e},
            }
            for e in (1, 2)
        ],
    }
    figs = {
        "input": plots.plot_input_masks(avg),
        "corr": plots.plot_correlations(
            {
                k: plots.class_correlations(plots.class_average_masks(v, labels, 10))
                for k, v in masks.items()
            }
        ),
        "examples": plots.plot_example_masks(masks, labels, per_class=3),
        "history": plots.plot_history(history),
    }
    for name, fig in figs.items():
        for path in plots.save_figure(fig, tmp_path / name):
            assert path.stat().st_size > 1000, path
            head = path.read_bytes()[:8]
            assert (
                head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")
            )


def test_units_figure_shows_the_fraction_kept_in_the_front_figures_colours() -> None:
    """With the layers' widths the bars are units / width (a 20-channel convolution is as
    readable as an 800-unit layer), and a method has one colour in both figures."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    units = {"sbp": {"conv1": 8, "fc1": 230}, "bb": {"conv1": 18, "fc1": 630}}
    fig = plots.plot_units_per_layer(units, widths={"conv1": 20, "fc1": 800})
    bars = fig.axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx([0.4, 0.2875, 0.9, 0.7875])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["conv1\n(20)", "fc1\n(800)"]
    counts = plots.plot_units_per_layer(units).axes[0].patches  # no widths: unit counts
    assert [b.get_height() for b in counts] == [8, 230, 18, 630]
    # the front lists the methods in another order; the colours follow the method
    front = plots.plot_front({m: [{"speedup": 2.0, "error": 9.0}] for m in ("bb", "sbp")})
    line_colour = {ln.get_label(): to_rgba(ln.get_color()) for ln in front.axes[0].lines}
    bar_colour = {"sbp": to_rgba(bars[0].get_facecolor()), "bb": to_rgba(bars[2].get_facecolor())}
    assert line_colour == bar_colour and bar_colour["sbp"] != bar_colour["bb"]
