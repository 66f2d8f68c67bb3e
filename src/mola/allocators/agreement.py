"""How well the shapes found by different seeds agree (``mola allocate --seeds N``).

A search that finds a property of the task gives the same shape whatever its seed; one that
finds noise gives shapes that do not correlate. For every pair of seeds this takes the Pearson
correlation over layers of the per-layer read-offs (expert numbers, ranks) and over modules of
the per-module expert numbers, and averages it over the pairs. The shape counts as stable when
the mean per-layer correlation of the expert numbers is at least :data:`STABLE` (and, when every
seed read off the very same numbers, the agreement is 1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

STABLE = 0.5
"""The mean per-layer correlation of expert numbers from which a shape counts as stable."""


def correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson's r of two equally long sequences; 1 if they are equal, 0 if one is constant
    and they differ (no linear agreement to measure)."""
    if len(a) != len(b) or not a:
        raise ValueError("correlation: two non-empty sequences of the same length")
    if list(a) == list(b):
        return 1.0
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [y - mb for y in b]
    sa, sb = math.sqrt(sum(x * x for x in da)), math.sqrt(sum(y * y for y in db))
    if sa == 0 or sb == 0:
        return 0.0
    return sum(x * y for x, y in zip(da, db, strict=True)) / (sa * sb)


def mean_pairwise(values: Sequence[Sequence[float]]) -> float:
    """The mean correlation over every pair of the sequences."""
    pairs = list(itertools.combinations(values, 2))
    return sum(correlation(a, b) for a, b in pairs) / len(pairs)


def seed_agreement(
    experts: Sequence[Sequence[float]],
    ranks: Sequence[Sequence[float]],
    module_experts: Sequence[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The agreement of ``N >= 2`` seeds' read-offs (per seed: per-layer lists, and optionally
    per-module expert numbers by module name)."""
    if len(experts) < 2:
        raise ValueError("seed_agreement: needs the read-offs of at least 2 seeds")
    out: dict[str, Any] = {
        "seeds": len(experts),
        "layer_experts_r": round(mean_pairwise(experts), 4),
        "layer_ranks_r": round(mean_pairwise(ranks), 4),
    }
    if module_experts:
        names = sorted(module_experts[0])
        out["module_experts_r"] = round(
            mean_pairwise([[m[n] for n in names] for m in module_experts]), 4
        )
    out["stable"] = out["layer_experts_r"] >= STABLE
    return out


def agreement_line(agreement: dict[str, Any]) -> str:
    """One sentence for the command's output."""
    text = (
        f"{agreement['seeds']} seeds agree: per-layer r {agreement['layer_experts_r']:+.2f} "
        f"(experts), {agreement['layer_ranks_r']:+.2f} (ranks)"
    )
    if "module_experts_r" in agreement:
        text += f", per-module r {agreement['module_experts_r']:+.2f} (experts)"
    if agreement["stable"]:
        return text + "; the shape is stable across seeds"
    return text + f"; no stable shape found (per-layer r < {STABLE}): the shape is seed noise"
