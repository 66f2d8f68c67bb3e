"""The allocation figure: experts per layer as bars, the rank as a line."""

from __future__ import annotations

import os
from collections.abc import Sequence


def plot_allocation(
    path: str | os.PathLike[str],
    num_experts: Sequence[int],
    ranks: Sequence[int],
    title: str = "",
) -> str:
    """Bar chart of experts per layer with the rank as a line on a second axis; returns ``path``."""
    from mola.analysis.plots import new_figure, save_figure

    layers = list(range(len(num_experts)))
    fig = new_figure(max(6.0, 0.28 * len(layers) + 2), 3.6)
    ax = fig.add_subplot()
    ax.bar(layers, num_experts, color="#4C72B0", label="experts")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("experts", color="#4C72B0")
    ax.set_xticks(layers[:: max(1, len(layers) // 15)])
    twin = ax.twinx()
    twin.plot(layers, ranks, color="#DD8452", marker="o", markersize=3, label="rank")
    twin.set_ylabel("rank r", color="#DD8452")
    twin.set_ylim(0, max(ranks) * 1.15 + 1)
    ax.set_ylim(0, max(num_experts) * 1.15 + 1)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
