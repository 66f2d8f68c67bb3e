"""Results of a sweep grouped over seeds: mean and standard deviation of each metric.

A group is the runs whose labels differ only by ``seed``. Its metrics are the fine-tuned
evaluation metrics of ``metrics.json`` (all numeric ones but ``n``, the number of test items) and
``train_s`` (training time in seconds): for each, the mean and the sample standard deviation
(``n - 1`` in the denominator; ``None`` with a single run). ``trainable_params`` and
``total_experts`` (experts per adapted module summed over the decoder layers) are reported as they
are, the same for every seed of a group.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from mola.sweep.runner import RunState
from mola.sweep.spec import Run

TIME_METRIC = "train_s"


@dataclass
class Group:
    """One row of the results table."""

    labels: dict[str, str]
    runs: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    trainable_params: int | None = None
    total_experts: int | None = None

    @property
    def n(self) -> int:
        return len(self.runs)

    def mean(self, metric: str) -> float | None:
        values = self.values.get(metric) or []
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float | None:
        values = self.values.get(metric) or []
        return statistics.stdev(values) if len(values) > 1 else None


def run_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of one finished run that the table averages."""
    out = {
        k: float(v)
        for k, v in (metrics.get("fine_tuned") or {}).items()
        if k != "n" and isinstance(v, int | float) and not isinstance(v, bool)
    }
    train_s = (metrics.get("timings") or {}).get(TIME_METRIC)
    if isinstance(train_s, int | float):
        out[TIME_METRIC] = float(train_s)
    return out


def total_experts(metrics: dict[str, Any]) -> int | None:
    experts = (metrics.get("allocation") or {}).get("num_experts")
    return int(sum(experts)) if experts else None


def group_runs(runs: list[Run], states: dict[str, RunState]) -> list[Group]:
    """Finished runs grouped by their non-seed labels, groups in the order of their first run."""
    groups: dict[tuple[tuple[str, str], ...], Group] = {}
    for run in runs:
        state = states.get(run.name)
        if state is None or state.status != "done" or state.metrics is None:
            continue
        group = groups.setdefault(run.group, Group(labels=dict(run.group)))
        group.runs.append(run.name)
        group.seeds.append(run.labels.get("seed", str(run.options.get("seed", ""))))
        for key, value in run_values(state.metrics).items():
            group.values.setdefault(key, []).append(value)
        if group.trainable_params is None:
            group.trainable_params = state.metrics.get("trainable_params")
        if group.total_experts is None:
            group.total_experts = total_experts(state.metrics)
    return list(groups.values())


def metric_names(groups: list[Group]) -> list[str]:
    """The metrics present in any group, evaluation metrics first and ``train_s`` last."""
    names: list[str] = []
    for group in groups:
        names += [k for k in group.values if k not in names and k != TIME_METRIC]
    if any(TIME_METRIC in g.values for g in groups):
        names.append(TIME_METRIC)
    return names
