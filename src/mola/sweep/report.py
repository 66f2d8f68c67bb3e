"""The results of a sweep: ``results.md``, ``results.csv``, ``results.json``, ``results.png``.

``results.csv`` has one row per group: the group's label columns (``variant`` and the non-seed
grid keys), ``n`` (finished runs), ``<metric>_mean`` and ``<metric>_std`` for each metric, then
``trainable_params`` and ``total_experts``. The Markdown table shows ``mean ± std`` and lists the
runs that failed or are still to run; it is also what the terminal shows. With a baseline
(``--baseline variant=square``) the Markdown report and ``results.json`` (``paired``) also hold
every group's per-seed differences from it (:func:`mola.sweep.aggregate.paired_differences`) with
their 95% t-interval and whether it excludes zero, and, where the runs wrote per-item predictions,
McNemar's test per seed and a paired bootstrap interval over the test items
(:mod:`mola.sweep.items`). The paired table shows ``accuracy``, for runs that scored several
tasks each ``<task>_accuracy``, and for one-pass runs ``one_pass_loss`` (a held-out loss,
:func:`mola.sweep.aggregate.one_pass_loss`); ``results.json`` has every metric.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from mola.sweep.aggregate import (
    ONE_PASS_LOSS,
    TIME_METRIC,
    Group,
    Paired,
    group_runs,
    metric_names,
    paired_differences,
    parse_baseline,
)
from mola.sweep.items import ItemTest, item_tests
from mola.sweep.runner import RunState
from mola.sweep.spec import VARIANT_KEY, Run, SweepSpec
from mola.utils.io import atomic_write, write_json, write_text

FILES = ("results.md", "results.csv", "results.json", "results.png")


def label_keys(groups: list[Group], runs: list[Run]) -> list[str]:
    """The group columns: ``variant`` (when the sweep has variants), then the non-seed grid keys."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k, _ in run.group if k not in keys]
    return sorted(keys, key=lambda k: k != VARIANT_KEY)


def csv_text(groups: list[Group], keys: list[str], metrics: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = [*keys, "n"]
    for m in metrics:
        header += [f"{m}_mean", f"{m}_std"]
    writer.writerow([*header, "trainable_params", "total_experts"])
    for g in groups:
        row: list[Any] = [g.labels.get(k, "") for k in keys] + [g.n]
        for m in metrics:
            row += [_num(g.mean(m)), _num(g.std(m))]
        row += [_num(g.trainable_params), _num(g.total_experts)]
        writer.writerow(row)
    return out.getvalue()


def markdown_table(groups: list[Group], keys: list[str], metrics: list[str]) -> str:
    header = [*keys, "n", *(_title(m) for m in metrics), "trainable params", "total experts"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        cells = [g.labels.get(k, "") for k in keys] + [str(g.n)]
        for m in metrics:
            cells.append(_mean_std(g.mean(m), g.std(m), m))
        cells += [_count(g.trainable_params), _count(g.total_experts)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baseline_of(runs: list[Run], text: str | None) -> tuple[str, str] | None:
    """The checked ``--baseline KEY=VALUE``: KEY a group key, VALUE one some run has."""
    if text is None:
        return None
    key, value = parse_baseline(text, label_keys([], runs))
    values = sorted({r.labels[key] for r in runs if key in r.labels})
    if value not in values:
        known = ", ".join(values)
        raise ValueError(f"--baseline: no run has {key}={value}; {key} is one of {known}")
    return key, value


def paired_metrics(metrics: list[str]) -> list[str]:
    """The metrics of the paired table: ``accuracy`` (else the first score), each
    ``<task>_accuracy``, and ``one_pass_loss`` where the runs have it."""
    scores = [m for m in metrics if m not in (TIME_METRIC, ONE_PASS_LOSS)]
    if not scores:
        return []
    first = "accuracy" if "accuracy" in scores else scores[0]
    loss = [ONE_PASS_LOSS] if ONE_PASS_LOSS in metrics else []
    return [first, *(m for m in scores if m.endswith("_accuracy")), *loss]


def paired_table(
    paired: list[Paired],
    keys: list[str],
    metrics: list[str],
    items: list[dict[str, ItemTest]] | None = None,
) -> str:
    """One row per group and paired metric; ``results.json`` has every metric."""
    shown = paired_metrics(metrics)
    items = items or [{} for _ in paired]
    with_items = any(items)
    header = [*keys, "metric"] if len(shown) > 1 else list(keys)
    header += ["seeds", "Δ mean [95% t-interval]", "per seed", "seeds ahead", "p", "resolved"]
    if with_items:
        header += ["McNemar p per seed (b/c)", "Δ items bootstrap 95%"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p, tests in zip(paired, items, strict=True):
        for metric in shown:
            diffs = p.diffs.get(metric)
            if not diffs:
                continue
            cells = [p.labels.get(k, "") for k in keys] + ([metric] if len(shown) > 1 else [])
            k = _scale(metric)
            digits = _digits(metric)
            cells += [",".join(p.seeds), _ci(p.mean(metric), p.interval(metric), k, digits)]
            cells.append(", ".join(f"{k * d:+.{digits}f}" for d in diffs))
            cells.append(f"{p.above(metric)} of {len(diffs)}")
            p_value = p.p_value(metric)
            cells.append("" if p_value is None else f"{p_value:.2g}")
            cells.append(_resolved(p, metric))
            if with_items:
                test = tests.get(metric)
                cells += ["", ""] if test is None else [_mcnemar(test), _boot(test)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_data(groups: list[Group], baseline: tuple[str, str]) -> dict[str, Any]:
    """``results.json``'s ``paired``: per group, per metric: the per-seed differences, mean, std,
    95% t-interval, seeds ahead, whether resolved; and the per-item tests where present."""
    rows = []
    for p in paired_differences(groups, *baseline):
        tests = item_tests(p)
        row: dict[str, Any] = {**p.labels, "seeds": p.seeds, "diffs": p.diffs}
        for m in p.diffs:
            ci = p.interval(m)
            row[f"{m}_diff_mean"] = p.mean(m)
            row[f"{m}_diff_std"] = p.std(m)
            row[f"{m}_diff_ci95"] = list(ci) if ci else None
            row[f"{m}_p"] = p.p_value(m)
            row[f"{m}_above"] = p.above(m)
            row[f"{m}_resolved"] = p.resolved(m)
        if tests:
            row["items"] = {m: t.to_dict() for m, t in tests.items()}
        rows.append(row)
    return {
        "baseline": dict([baseline]),
        "interval": "95% Student t over seeds (n - 1 degrees of freedom), of the mean "
        "difference; resolved: the interval excludes 0",
        "groups": rows,
    }


def report_data(
    spec: SweepSpec,
    runs: list[Run],
    states: dict[str, RunState],
    baseline: tuple[str, str] | None = None,
    groups: list[Group] | None = None,
) -> tuple[list[Group], list[str], list[str], dict[str, Any]]:
    groups = group_runs(runs, states) if groups is None else groups
    keys = label_keys(groups, runs)
    metrics = metric_names(groups)
    data: dict[str, Any] = {
        "sweep": spec.path,
        "output": spec.output,
        "group_keys": keys,
        "metrics": metrics,
        "groups": [
            {
                **g.labels,
                "n": g.n,
                "seeds": g.seeds,
                "runs": g.runs,
                **{f"{m}_mean": g.mean(m) for m in metrics},
                **{f"{m}_std": g.std(m) for m in metrics},
                "values": g.values,
                "trainable_params": g.trainable_params,
                "total_experts": g.total_experts,
            }
            for g in groups
        ],
        "runs": [
            {
                "name": r.name,
                "labels": r.labels,
                "status": states[r.name].status,
                **({"error": states[r.name].error} if states[r.name].error else {}),
            }
            for r in runs
        ],
    }
    if baseline is not None:
        data["paired"] = paired_data(groups, baseline)
    return groups, keys, metrics, data


def markdown_report(
    spec: SweepSpec,
    runs: list[Run],
    states: dict[str, RunState],
    groups: list[Group],
    baseline: tuple[str, str] | None = None,
) -> str:
    keys = label_keys(groups, runs)
    metrics = metric_names(groups)
    done = sum(1 for r in runs if states[r.name].status == "done")
    lines = [
        f"Sweep `{spec.path}`: {done} of {len(runs)} runs finished; mean ± sample standard "
        "deviation over seeds (n runs).",
        "",
        markdown_table(groups, keys, metrics) if groups else "(no finished runs yet)",
    ]
    if baseline is not None:
        key, value = baseline
        paired = paired_differences(groups, key, value)
        items = [item_tests(p) for p in paired]
        lines += [
            "",
            f"Paired with {key}={value} (the same other labels, the same seed): the mean of the "
            "per-seed differences (this group minus the baseline; scores in percentage points) "
            "with its 95% t-interval (Student t, seeds - 1 degrees of freedom); 'ahead': seeds "
            "on which it beat the baseline (a higher score, a lower loss); 'one_pass_loss': the "
            "mean training loss over the last fifth of the steps of a run that saw each item at "
            "most once, so each batch was scored before the model trained on it (a held-out "
            "loss); 'p': the paired t-test's two-sided p-value; "
            "'resolved': the interval excludes 0 (else the difference is not detected, and not "
            "refuted either: any true difference inside the interval fits the data); 'n/a (no "
            "spread)': the seeds' differences are all equal, which says nothing about the noise, "
            "so no interval and no p-value.",
        ]
        if any(items):
            lines += [
                "Per test item, where the runs wrote predictions: McNemar's exact test per seed "
                "(b items right only in this group, c only in the baseline) and a paired "
                "bootstrap 95% interval over the items (10,000 resamples, seed 0) of the "
                "difference averaged over seeds: the test set's sampling error alone.",
            ]
        lines += [
            "",
            paired_table(paired, keys, metrics, items) if paired else "(no pairs finished yet)",
        ]
    failed = [r for r in runs if states[r.name].status == "failed"]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- `{r.name}`: {states[r.name].error}" for r in failed]
    missing = [r for r in runs if states[r.name].status not in ("done", "failed")]
    if missing:
        lines += ["", f"Not finished ({len(missing)}):", ""]
        lines += [f"- `{r.name}` ({states[r.name].status})" for r in missing]
    return "\n".join(lines) + "\n"


def write_report(
    spec: SweepSpec,
    runs: list[Run],
    states: dict[str, RunState],
    baseline: tuple[str, str] | None = None,
    groups: list[Group] | None = None,
) -> str:
    """Write the four result files into the sweep's output dir; returns the Markdown report.

    ``baseline`` (``(key, value)``, see :func:`baseline_of`) adds the paired differences;
    ``groups`` (e.g. :func:`mola.sweep.aggregate.groups_from_results`) replaces the groups read
    from the run dirs."""
    groups, keys, metrics, data = report_data(spec, runs, states, baseline, groups)
    text = markdown_report(spec, runs, states, groups, baseline)
    os.makedirs(spec.output, exist_ok=True)
    write_text(os.path.join(spec.output, "results.md"), text)
    write_text(os.path.join(spec.output, "results.csv"), csv_text(groups, keys, metrics))
    write_json(os.path.join(spec.output, "results.json"), data)
    plot_results(groups, keys, metrics, os.path.join(spec.output, "results.png"))
    return text


def plot_results(groups: list[Group], keys: list[str], metrics: list[str], path: str) -> None:
    """``results.png``: :func:`results_figure` written atomically."""
    fig = results_figure(groups, keys, metrics)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def results_figure(groups: list[Group], keys: list[str], metrics: list[str]) -> Any:
    """Bars of the first metric (``accuracy`` when present), mean with ±1 std error bars; for
    runs that scored several tasks, one more panel per ``<task>_accuracy`` beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = paired_metrics(metrics)
    width = max(4.0, 0.7 * len(groups) + 2) * (0.75 * len(panels) if len(panels) > 1 else 1)
    fig = Figure(figsize=(width, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center")
        ax.set_axis_off()
    for i, metric in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _bars(ax, groups, keys, metric, width / len(panels) / max(1, len(groups)))
        if len(panels) > 1:
            ax.set_title("mean of the tasks" if i == 0 else metric.removesuffix("_accuracy"))
    fig.tight_layout()
    return fig


def _bars(
    ax: Any, groups: list[Group], keys: list[str], metric: str, inches_per_bar: float
) -> None:
    means = [g.mean(metric) or 0.0 for g in groups]
    errs = [g.std(metric) or 0.0 for g in groups]
    labels = ["\n".join(g.labels.get(k, "") for k in keys) + f"\nn={g.n}" for g in groups]
    shade = keys[-1] if len(keys) > 1 else None  # e.g. colour by task when arms x tasks
    kinds = list(dict.fromkeys(g.labels.get(shade, "") for g in groups)) if shade else [""]
    palette = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    colors = [
        palette[kinds.index(g.labels.get(shade, "")) % len(palette)] if shade else palette[0]
        for g in groups
    ]
    ax.bar(range(len(groups)), means, yerr=errs, capsize=4, color=colors)
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    if _crowded(labels, inches_per_bar):
        ax.tick_params(axis="x", labelrotation=35)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    low = min(m - e for m, e in zip(means, errs, strict=True))
    high = max(m + e for m, e in zip(means, errs, strict=True))
    pad = max(0.02, 0.15 * (high - low))
    ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.grid(axis="y", alpha=0.3)


#: Width of one character of a 7-point tick label, in inches (measured: about 0.04).
CHAR_INCHES = 0.045


def _crowded(labels: list[str], inches_per_bar: float) -> bool:
    """True when a label's longest line is wider than its bar's share of the panel, so that
    neighbours would overlap: the labels are then slanted."""
    longest = max((len(line) for label in labels for line in label.split("\n")), default=0)
    return longest * CHAR_INCHES > inches_per_bar


def _num(value: float | int | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else repr(float(value))


def _title(metric: str) -> str:
    return "train time s" if metric == TIME_METRIC else metric


def _mean_std(mean: float | None, std: float | None, metric: str) -> str:
    if mean is None:
        return ""
    if metric == TIME_METRIC:
        return f"{mean:.0f}" + (f" ± {std:.0f}" if std is not None else "")
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _scale(metric: str) -> float:
    """100 for the 0-1 scores (shown in points), 1 for any other metric (e.g. ``loss``)."""
    return 100.0 if metric.endswith(("accuracy", "accuracy_norm", "f1", "mcc")) else 1.0


def _digits(metric: str) -> int:
    """Decimals of a difference: 2 for scores in points, 3 for a loss (gaps of ~0.01 matter)."""
    return 2 if _scale(metric) != 1.0 else 3


def _ci(mean: float | None, ci: tuple[float, float] | None, k: float, digits: int = 2) -> str:
    if mean is None:
        return ""
    text = f"{k * mean:+.{digits}f}"
    return text + (f" [{k * ci[0]:+.{digits}f}, {k * ci[1]:+.{digits}f}]" if ci else "")


def _resolved(p: Paired, metric: str) -> str:
    if p.interval(metric) is None:
        return "n/a (1 seed)" if len(p.diffs.get(metric) or []) < 2 else "n/a (no spread)"
    return "yes" if p.resolved(metric) else "no"


def _mcnemar(test: ItemTest) -> str:
    return ", ".join(f"{t.p:.2g} ({t.b}/{t.c})" for t in test.per_seed)


def _boot(test: ItemTest) -> str:
    if test.interval is None:
        return ""
    low, high = test.interval
    return f"{100 * test.mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def _count(value: int | None) -> str:
    return "" if value is None else f"{value:,d}"
