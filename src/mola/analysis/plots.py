"""Figures of an expert analysis (:func:`mola.analysis.analyze` reports).

Every function takes a report dict (fresh, or an ``analysis.json`` read back), returns the
:class:`matplotlib.figure.Figure` it drew, and, given ``path``, also writes it there as a PNG.
Figures are built on matplotlib's non-interactive Agg canvas without ``pyplot``, so nothing
here touches a global backend or leaks open figures; in a notebook the returned figure shows
itself.

* :func:`plot_expert_load`: heatmap of the expert load, layers x experts (blank where a layer
  has fewer experts), cells annotated with their share and coloured by share x E (1 =
  balanced), dead experts in red;
* :func:`plot_redundancy`: expert redundancy by layer, one line per module type plus the layer
  mean;
* :func:`plot_entropy`: routing entropy / log(E) by layer, one line per module type plus the
  layer mean;
* :func:`plot_compare_redundancy`, :func:`plot_compare_entropy`: the layer-mean curves of
  several reports overlaid;
* :func:`plot_active_experts`: for dynamic routers (a per-token number of experts), the
  histogram of active experts per token, layers x count, with each layer's mean;
* :func:`save_plots`: the first three (and the fourth for dynamic routers) into a directory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mola.utils.io import atomic_write

DPI = 100
"""Dots per inch of every figure, so a PNG is ``figsize * DPI`` pixels."""

LOAD_PNG = "expert_load.png"
REDUNDANCY_PNG = "redundancy.png"
ENTROPY_PNG = "entropy.png"
ACTIVE_PNG = "active_experts.png"
COMPARE_REDUNDANCY_PNG = "redundancy_compare.png"
COMPARE_ENTROPY_PNG = "entropy_compare.png"

_REDUNDANCY_LABEL = r"mean pairwise $\|\Delta W_i - \Delta W_j\|_F$"


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on an Agg canvas, ``width x height`` inches at :data:`DPI`."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> str:
    """Write ``fig`` as a PNG at ``path`` atomically; return the path."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _finish(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _value(value: Any) -> float:
    return math.nan if value is None else float(value)


def _layers(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    layers = report.get("layers")
    if not layers:
        raise ValueError("the report has no layers; pass a report from mola.analysis.analyze")
    return list(layers)


def _require_routing(report: Mapping[str, Any], what: str) -> None:
    if not report.get("has_routing"):
        raise ValueError(f"{what} needs routing statistics; analyse the adapter with data")


def _suffix(report: Mapping[str, Any]) -> str:
    label = report.get("label")
    return f" — {label}" if label else ""


def _layer_axis(ax: Any, layers: Sequence[Mapping[str, Any]]) -> None:
    """x axis = decoder layer (ticks at every layer when few), top axis = experts per layer."""
    xs = [item["layer"] for item in layers]
    ax.set_xlabel("decoder layer")
    step = max(1, math.ceil(len(xs) / 40))
    ax.set_xticks(xs[::step])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    top = ax.secondary_xaxis("top")
    top.set_xticks(xs[::step], [str(item["num_experts"]) for item in layers[::step]])
    top.tick_params(axis="x", labelsize=7, length=2)
    top.set_xlabel("experts per layer", fontsize=8)
    ax.grid(True, alpha=0.3)


def _width(num_layers: int) -> float:
    return min(16.0, max(7.5, 3.0 + 0.3 * num_layers))


def load_matrix(report: Mapping[str, Any]) -> np.ndarray:
    """``(layers, max experts)`` expert-load array, NaN where a layer has fewer experts."""
    layers = _layers(report)
    width = max(item["num_experts"] for item in layers)
    data = np.full((len(layers), width), np.nan)
    for row, item in enumerate(layers):
        load = item.get("load") or []
        data[row, : len(load)] = [_value(v) for v in load]
    return data


def plot_expert_load(
    report: Mapping[str, Any], path: str | os.PathLike[str] | None = None
) -> Figure:
    """Heatmap of each layer's expert load, layers bottom to top, experts left to right.

    Each cell is annotated with the expert's share of the layer's top-k assignments (padding
    excluded) and coloured by that share relative to the uniform share ``1/E``, so that 1 means
    balanced in every layer whatever its expert count. Cells past a layer's experts are blank;
    dead experts (share below the report's threshold) are outlined and labelled in red.

    Raises:
        ValueError: the report has no routing statistics.
    """
    _require_routing(report, "the expert-load heatmap")
    layers = _layers(report)
    data = load_matrix(report)
    experts = np.array([[item["num_experts"]] for item in layers], dtype=float)
    relative = data * experts
    rows, cols = data.shape
    fig = new_figure(max(5.5, 2.8 + 0.75 * cols), max(3.8, 2.0 + 0.3 * rows))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    finite = relative[np.isfinite(relative)]
    norm = Normalize(vmin=0.0, vmax=max(2.0, float(finite.max()) if finite.size else 0.0))
    image = ax.imshow(
        np.ma.masked_invalid(relative),
        cmap=cmap,
        norm=norm,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
    )
    colorbar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.02)
    colorbar.set_label("load / uniform share 1/E  (1 = balanced)")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows), [str(item["layer"]) for item in layers])
    ax.tick_params(axis="y", labelsize=8 if rows <= 40 else 6)
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    threshold = float(report.get("dead_threshold") or 0.0)
    ax.set_title(
        f"Expert load by layer{_suffix(report)}\n"
        f"(% = share of top-k assignments, padding excluded; "
        f"red box = dead, < {100 * threshold:g}%)",
        fontsize=10,
    )
    annotate = rows <= 48 and cols <= 16
    for row in range(rows):
        for col in range(cols):
            value = data[row, col]
            if not np.isfinite(value):
                continue
            dead = value < threshold
            if dead:
                box = Rectangle((col - 0.45, row - 0.4), 0.9, 0.8, fill=False, ec="red", lw=2)
                ax.add_patch(box)
            if annotate:
                dark = norm(relative[row, col]) < 0.55
                color = "white" if dead or dark else "black"
                ax.text(
                    col,
                    row,
                    f"{100 * value:.0f}%" if value >= 0.0995 else f"{100 * value:.1f}%",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=color,
                    fontweight="bold" if dead else "normal",
                )
    return _finish(fig, path)


def is_dynamic(report: Mapping[str, Any]) -> bool:
    """Whether the report has per-token active-expert histograms of a dynamic router."""
    return bool(report.get("has_routing")) and any(
        item.get("dynamic") and item.get("active_hist") for item in _layers(report)
    )


def plot_active_experts(
    report: Mapping[str, Any], path: str | os.PathLike[str] | None = None
) -> Figure:
    """Histogram of the number of experts each token uses, per layer (dynamic routers).

    Rows are decoder layers (bottom to top), columns the number of active experts (0 to the
    largest E); each cell is the share of the layer's (token, module) rows using that many
    experts, and the layer's mean (``active_experts``) is printed at the right.

    Raises:
        ValueError: the report has no routing statistics.
    """
    _require_routing(report, "the active-experts histogram")
    layers = [item for item in _layers(report) if item.get("active_hist")]
    if not layers:
        raise ValueError("the active-experts histogram needs active_hist in the report")
    cols = max(len(item["active_hist"]) for item in layers)
    data = np.full((len(layers), cols), np.nan)
    for row, item in enumerate(layers):
        hist = np.asarray(item["active_hist"], dtype=float)
        data[row, : hist.shape[0]] = hist / max(hist.sum(), 1.0)
    fig = new_figure(max(5.5, 3.2 + 0.6 * cols), max(3.8, 2.0 + 0.3 * len(layers)))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="white")
    image = ax.imshow(
        np.ma.masked_invalid(data),
        cmap=cmap,
        norm=Normalize(0.0, 1.0),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
    )
    fig.colorbar(image, ax=ax, fraction=0.08, pad=0.02).set_label("share of tokens")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(len(layers)), [str(item["layer"]) for item in layers])
    ax.set_xlabel("active experts per token")
    ax.set_ylabel("decoder layer")
    for row, item in enumerate(layers):
        mean = item.get("active_experts")
        if mean is not None:
            ax.text(cols - 0.4, row, f" mean {mean:.2f}", va="center", fontsize=7)
    ax.set_title(f"Active experts per token{_suffix(report)}", fontsize=10)
    return _finish(fig, path)


def _module_curves(
    report: Mapping[str, Any], field: str
) -> tuple[list[int], dict[str, list[float]], list[float]]:
    layers = _layers(report)
    xs = [item["layer"] for item in layers]
    curves = {
        key: [_value(item["modules"].get(key, {}).get(field)) for item in layers]
        for key in report.get("modules", [])
    }
    mean = [_value(item.get(field)) for item in layers]
    return xs, curves, mean


def plot_redundancy(
    report: Mapping[str, Any], path: str | os.PathLike[str] | None = None
) -> Figure:
    """Expert redundancy by layer: one line per module type and the layer mean (dashed)."""
    layers = _layers(report)
    xs, curves, mean = _module_curves(report, "redundancy")
    fig = new_figure(_width(len(xs)), 5.0)
    ax = fig.add_subplot()
    for key, ys in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=key)
    ax.plot(xs, mean, color="black", linestyle="--", linewidth=2.2, label="layer mean")
    ax.set_ylabel(_REDUNDANCY_LABEL)
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"Expert redundancy by layer{_suffix(report)}\n(lower = experts more alike)", fontsize=10
    )
    _layer_axis(ax, layers)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 4 else 1, loc="best")
    return _finish(fig, path)


def plot_entropy(report: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> Figure:
    """Routing entropy / log(E) by layer: one line per module type and the layer mean (dashed).

    Raises:
        ValueError: the report has no routing statistics.
    """
    _require_routing(report, "the entropy plot")
    layers = _layers(report)
    xs, curves, mean = _module_curves(report, "normalised_entropy")
    fig = new_figure(_width(len(xs)), 5.0)
    ax = fig.add_subplot()
    for key, ys in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, alpha=0.8, label=key)
    ax.plot(xs, mean, color="black", linestyle="--", linewidth=2.2, label="layer mean")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="_uniform")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("routing entropy / log(E)")
    ax.set_title(
        f"Routing entropy by layer{_suffix(report)}\n(1 = uniform over experts, 0 = one expert)",
        fontsize=10,
    )
    _layer_axis(ax, layers)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 4 else 1, loc="best")
    return _finish(fig, path)


def _compare(
    runs: Sequence[tuple[str, Mapping[str, Any]]],
    field: str,
    ylabel: str,
    title: str,
) -> Figure:
    if not runs:
        raise ValueError("nothing to compare: give at least one report")
    num_layers = max(len(_layers(report)) for _, report in runs)
    fig = new_figure(_width(num_layers), 5.0)
    ax = fig.add_subplot()
    markers = "osD^v<>ph*"
    for i, (label, report) in enumerate(runs):
        layers = _layers(report)
        xs = [item["layer"] for item in layers]
        ys = [_value(item.get(field)) for item in layers]
        ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=4, linewidth=1.8, label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def plot_compare_redundancy(
    runs: Sequence[tuple[str, Mapping[str, Any]]], path: str | os.PathLike[str] | None = None
) -> Figure:
    """Overlay the layer-mean redundancy curves of several ``(label, report)`` runs."""
    fig = _compare(
        runs,
        "redundancy",
        _REDUNDANCY_LABEL,
        "Expert redundancy by layer (layer mean over modules; lower = experts more alike)",
    )
    fig.axes[0].set_ylim(bottom=0)
    return _finish(fig, path)


def plot_compare_entropy(
    runs: Sequence[tuple[str, Mapping[str, Any]]], path: str | os.PathLike[str] | None = None
) -> Figure:
    """Overlay the normalised routing-entropy curves of several ``(label, report)`` runs.

    Runs without routing statistics are left out.

    Raises:
        ValueError: no run has routing statistics.
    """
    routed = [(label, report) for label, report in runs if report.get("has_routing")]
    if not routed:
        raise ValueError("the entropy comparison needs routing statistics; analyse with data")
    fig = _compare(
        routed,
        "normalised_entropy",
        "routing entropy / log(E)",
        "Routing entropy by layer (1 = uniform over experts, 0 = one expert)",
    )
    fig.axes[0].set_ylim(0.0, 1.05)
    fig.axes[0].axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="_uniform")
    return _finish(fig, path)


def save_plots(report: Mapping[str, Any], directory: str | os.PathLike[str]) -> list[str]:
    """Write ``expert_load.png``, ``redundancy.png`` and ``entropy.png`` into ``directory``,
    and ``active_experts.png`` for a dynamic router.

    A weights-only report (no routing statistics) gets only ``redundancy.png``.

    Returns:
        The paths written.
    """
    directory = os.fspath(directory)
    written = [save_figure(plot_redundancy(report), os.path.join(directory, REDUNDANCY_PNG))]
    if report.get("has_routing"):
        written.insert(0, save_figure(plot_expert_load(report), os.path.join(directory, LOAD_PNG)))
        written.append(save_figure(plot_entropy(report), os.path.join(directory, ENTROPY_PNG)))
    if is_dynamic(report):
        figure = plot_active_experts(report)
        written.append(save_figure(figure, os.path.join(directory, ACTIVE_PNG)))
    return written
