"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A text table with a rule under the header; the first column left-aligned, the rest right."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        parts = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        return "  ".join(parts).rstrip()

    lines = [line(r) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_table(named: dict[str, dict[str, float]]) -> str:
    """One row per metric, one column per evaluated model (e.g. zero-shot, fine-tuned)."""
    keys: list[str] = []
    for metrics in named.values():
        keys += [k for k in metrics if k not in keys]
    rows = [[k, *(m.get(k, "") for m in named.values())] for k in keys]
    return table(["metric", *named], rows)
