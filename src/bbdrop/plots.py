"""Figures of the paper, from masks and training histories (matplotlib, PNG and PDF).

* :func:`plot_input_masks`: class-average gate values of the input layer as
  images (paper Fig. 1, bottom left);
* :func:`plot_correlations`: correlation matrix of the class-average masks of
  each layer (Fig. 1, bottom right);
* :func:`plot_example_masks`: per-example DBB masks grouped by class (Fig. 2);
* :func:`plot_history`: test error, KL and units kept per epoch of each stage.

The computations (:func:`class_average_masks`, :func:`class_correlations`)
are plain tensor functions; the plotting functions return a
``matplotlib.figure.Figure`` built without pyplot, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "class_average_masks",
    "class_correlations",
    "method_colour",
    "plot_correlations",
    "plot_example_masks",
    "plot_front",
    "plot_history",
    "plot_input_masks",
    "plot_units_per_layer",
    "save_figure",
]


def _figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("bbdrop's figures need matplotlib: pip install 'bbdrop[plots]'") from err
    return Figure(**kwargs)


# One colour per method in every figure, in the paper's order (matplotlib's "tab10").
_METHOD_COLOURS = dict(zip(("svd", "ssl", "sbp", "l0", "vib", "bb", "dbb"),
                           (f"C{i}" for i in range(7)), strict=True))  # fmt: skip


def method_colour(method: str) -> str:
    """The colour of ``method`` in every figure; other names get the next colours of
    the cycle, the same for the same name."""
    if method not in _METHOD_COLOURS:
        _METHOD_COLOURS[method] = f"C{len(_METHOD_COLOURS) % 10}"
    return _METHOD_COLOURS[method]


def class_average_masks(masks: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean mask of the examples of each class: (N, K), (N,) -> (C, K)."""
    if masks.dim() != 2 or labels.shape != masks.shape[:1]:
        raise ValueError(
            f"masks must be (N, K) and labels (N,), got {tuple(masks.shape)} and "
            f"{tuple(labels.shape)}"
        )
    counts = torch.bincount(labels, minlength=num_classes).to(masks.dtype)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"no example of class(es) {missing}; pass data with every class")
    sums = torch.zeros(num_classes, masks.shape[1], dtype=masks.dtype)
    sums.index_add_(0, labels, masks)
    return sums / counts[:, None]


def class_correlations(class_avg: Tensor) -> Tensor:
    """Pearson correlation between the class-average masks: (C, K) -> (C, C).

    Units whose average mask is the same for every class carry no information
    on the classes and are left out; if none is left, the result is all NaN.
    """
    varying = class_avg.std(dim=0) > 0
    if not varying.any():
        return torch.full((class_avg.shape[0],) * 2, float("nan"))
    return torch.corrcoef(class_avg[:, varying])


def plot_input_masks(
    class_avg: Tensor, image_shape: tuple[int, int] = (28, 28), title: str = ""
) -> Figure:
    """One image per class of the input gate's class-average values."""
    c = class_avg.shape[0]
    cols = min(c, 5)
    rows = -(-c // cols)
    fig = _figure(figsize=(2.0 * cols, 2.1 * rows + 0.4), layout="constrained")
    vmax = float(class_avg.max()) or 1.0
    for i in range(c):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(class_avg[i].reshape(image_shape).numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"class {i}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title or "class-average gate values of the input layer")
    return fig


def plot_correlations(correlations: Mapping[str, Tensor], title: str = "") -> Figure:
    """One correlation matrix per layer, on a common colour scale [-1, 1]."""
    n = len(correlations)
    fig = _figure(figsize=(3.2 * n + 0.8, 3.4), layout="constrained")
    image = None
    for i, (name, corr) in enumerate(correlations.items()):
        ax = fig.add_subplot(1, n, i + 1)
        image = ax.imshow(corr.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"layer {name}", fontsize=9)
        ax.set_xlabel("class")
        ax.set_ylabel("class")
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8)
    fig.suptitle(title or "correlation of class-average masks")
    return fig


def plot_example_masks(
    masks: Mapping[str, Tensor], labels: Tensor, per_class: int = 10, title: str = ""
) -> Figure:
    """Per-example masks of the given layers, ``per_class`` examples of each class
    stacked by class (rows: examples; columns: units)."""
    classes = sorted(set(labels.tolist()))
    picks = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in classes])
    n = len(masks)
    fig = _figure(figsize=(4.0 * n, 0.06 * len(picks) + 1.5), layout="constrained")
    for i, (name, m) in enumerate(masks.items()):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(m[picks].numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {name}", fontsize=9)
        ax.set_xlabel("unit")
        ticks = [j * per_class + per_class / 2 for j in range(len(classes))]
        ax.set_yticks(ticks, [str(c) for c in classes], fontsize=7)
        ax.set_ylabel("examples, by class")
    fig.suptitle(title or "per-example DBB masks")
    return fig


def plot_history(history: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "") -> Figure:
    """Test error, KL and units kept (sum over layers) per epoch, stages one after another."""
    fig = _figure(figsize=(12, 3.4), layout="constrained")
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    offset = 0
    for stage, records in history.items():
        if not records:
            continue
        epochs = [offset + r["epoch"] for r in records]
        axes[0].plot(epochs, [r["error"] for r in records], label=stage)
        axes[1].plot(epochs, [r["kl"] for r in records], label=stage)
        units = [
            sum(r["active"].values()) if r.get("active") else sum(r["units"].values())
            for r in records
        ]
        if any(r["units"] for r in records):  # a stage without gates keeps everything
            axes[2].plot(epochs, units, label=stage, color=axes[0].lines[-1].get_color())
        offset = epochs[-1]
    for ax, name in zip(axes, ("test error (%)", "KL", "units kept (DBB: active)"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].set_yscale("symlog")
    fig.suptitle(title or "training curves")
    return fig


def plot_front(
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]],
    chosen: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    dense_error: float | None = None,
    title: str = "",
    margin: float | None = None,
    ylabel: str = "error (%)",
) -> Figure:
    """Error against FLOP speedup (log axis): one curve per method from its sweep
    (points ``{"speedup", "error"}``, joined in order of regularisation strength),
    with ``chosen`` points (e.g. the test-set runs of the selected settings, one per
    seed) on top as filled markers of the same colour."""
    fig = _figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for method, points in sweeps.items():
        ax.plot([p["speedup"] for p in points], [p["error"] for p in points], marker="o",
                markerfacecolor="none", label=method, color=method_colour(method))  # fmt: skip
        for p in (chosen or {}).get(method, ()):
            ax.plot(p["speedup"], p["error"], marker="*", markersize=11, linestyle="none",
                    color=method_colour(method))  # fmt: skip
    if dense_error is not None:
        ax.axhline(dense_error, color="grey", linestyle=":", label="dense")
        if margin is not None:
            ax.axhline(dense_error + margin, color="grey", linestyle="--", linewidth=0.8,
                       label=f"dense + {margin:g} (selection bound)")  # fmt: skip
    if dense_error is not None:  # the region that matters: near the dense network
        ax.set_ylim(top=min(ax.get_ylim()[1], dense_error + 8.0))
    ax.set_xscale("log")
    ax.set_xlabel("FLOP speedup (keep masks)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or "accuracy-sparsity front (open: sweep; stars: chosen, per seed)")
    return fig


def plot_scale_curves(
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]], title: str = ""
) -> Figure:
    """FLOP speedup against the regularisation's strength, both on log axes: one curve
    per method from its sweep (points ``{"scale", "speedup", "error"}``, ``scale``
    relative to the method's reference weight), the validation error printed beside
    each point: how far a method's strength moves its size."""
    fig = _figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for method, points in sweeps.items():
        points = sorted(points, key=lambda p: p["scale"])
        xs, ys = [p["scale"] for p in points], [p["speedup"] for p in points]
        ax.plot(xs, ys, marker="o", label=method, color=method_colour(method))
        for p in points:
            ax.annotate(f"{p['error']:.1f}", (p["scale"], p["speedup"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3),
                        color=method_colour(method))  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("strength (kl_scale relative to the method's reference)")
    ax.set_ylabel("FLOP speedup (keep masks)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or "strength against size (labels: validation error, %)")
    return fig


def plot_units_per_layer(
    units: Mapping[str, Mapping[str, float]],
    title: str = "",
    widths: Mapping[str, int] | None = None,
) -> Figure:
    """Units kept per gated layer, one group of bars per layer, one bar per method.
    With ``widths`` (each layer's units before pruning) the bars show the fraction
    kept, so a 20-channel convolution reads as well as an 800-unit dense layer, and
    each layer is labelled with its width."""
    fig = _figure(figsize=(7.2, 3.8), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    methods = list(units)
    layers = list(next(iter(units.values()))) if units else []
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(layers))]
        kept = [units[method].get(layer, 0) / (widths[layer] if widths else 1) for layer in layers]
        ax.bar(xs, kept, width, label=method, color=method_colour(method))
    labels = [f"{layer}\n({widths[layer]})" if widths else layer for layer in layers]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], labels)
    ax.set_xlabel("gated layer (units before pruning)" if widths else "gated layer")
    if widths:
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction of units kept (DBB: active)")
    else:
        ax.set_ylabel("units kept (DBB: active)")
    ax.legend(fontsize=8)
    ax.set_title(title or "units kept per layer")
    return fig


def save_figure(fig: Figure, stem: str | Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf, both or neither (rendered in memory, then
    :func:`bbdrop.files.write_together`); returns the paths."""
    import io

    from bbdrop.files import check_writable, write_together

    stem = Path(stem)
    rendered = {}
    for suffix, options in ((".png", {"dpi": 150}), (".pdf", {})):
        check_writable(stem.parent / (stem.name + suffix))
        buffer = io.BytesIO()
        fig.savefig(buffer, format=suffix[1:], **options)
        rendered[stem.parent / (stem.name + suffix)] = buffer.getvalue()
    write_together(rendered)
    return list(rendered)
