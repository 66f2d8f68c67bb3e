"""A terminal summary of an analysis report (:func:`mola.analysis.report.analyze`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mola.utils.tables import table as format_table


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _dead_text(dead: list[int] | None) -> str:
    if dead is None:
        return "-"
    if not dead:
        return "0"
    listed = ",".join(map(str, dead[:4])) + (",…" if len(dead) > 4 else "")
    return f"{len(dead)} ({listed})"


def format_summary(report: Mapping[str, Any], *, per_module: bool = True) -> str:
    """A terminal summary of a report: one row per layer, then per-module tables.

    Args:
        report: a report from :func:`analyze` (or a loaded ``analysis.json``).
        per_module: also print layer x module tables of redundancy (and entropy / log E).
    """
    routed = bool(report.get("has_routing"))
    out = []
    title = report.get("label") or report.get("adapter") or "adapter"
    line = f"MoLA analysis of {title}"
    if routed:
        line += f": {report.get('tokens')} tokens"
        if report.get("data", {}) and report["data"].get("examples") is not None:
            line += f" from {report['data']['examples']} examples"
        line += f"; dead = load < {report.get('dead_threshold'):g}"
    out.append(line)
    headers = ["layer", "E", "k", "r"]
    if routed:
        headers += ["entropy/logE", "balance", "min load", "max load", "dead"]
    headers += ["redundancy", "|dW|"]
    rows = []
    for item in report["layers"]:
        row = [str(item["layer"]), str(item["num_experts"]), str(item["top_k"] or "-")]
        row.append(str(item["r"]))
        if routed:
            load = item["load"] or []
            row += [
                _fmt(item["normalised_entropy"], ".3f"),
                _fmt(item["balance_loss"], ".3f"),
                _fmt(min(load), ".3f") if load else "-",
                _fmt(max(load), ".3f") if load else "-",
                _dead_text(item["dead_experts"]),
            ]
        row += [_fmt(item["redundancy"], ".4g"), _fmt(item["mean_expert_norm"], ".4g")]
        rows.append(row)
    out.append(format_table(headers, rows))
    if per_module and report.get("modules"):
        tables = [("redundancy", ".4g", "Redundancy (mean pairwise ||dW_i - dW_j||_F) by module")]
        if routed:
            tables.append(("normalised_entropy", ".3f", "Routing entropy / log(E) by module"))
        for field, spec, caption in tables:
            rows = []
            for item in report["layers"]:
                mods = item["modules"]
                cells = [_fmt(mods[m][field], spec) if m in mods else "" for m in report["modules"]]
                rows.append([str(item["layer"]), *cells])
            out += ["", caption, format_table(["layer", *report["modules"]], rows)]
    return "\n".join(out)
