"""Results of a sweep grouped over seeds: mean and standard deviation of each metric.

A group is the runs whose labels differ only by ``seed``. Its metrics are the fine-tuned
evaluation metrics of ``metrics.json`` (all numeric ones but ``n``, the number of test items) and
``train_s`` (training time in seconds): for each, the mean and the sample standard deviation
(``n - 1`` in the denominator; ``None`` with a single run). ``trainable_params`` and
``total_experts`` (experts per adapted module summed over the decoder layers) are reported as they
are, the same for every seed of a group.

:func:`paired_differences` compares every group with a baseline group (``--baseline
variant=square``): the group that has the same labels but the baseline's value of one key. Runs
are paired by seed (the same seed gives the same data order, initial router/expert draws aside),
and for each metric it reports the per-seed differences, their mean and sample standard deviation,
the 95% t-interval of the mean difference (:func:`mola.sweep.stats.t_interval`, ``n - 1``
degrees of freedom) and how many seeds came out above the baseline: a difference whose interval
holds zero is not resolved. :func:`groups_from_results` rebuilds the groups from a
``results.json`` written earlier (its per-seed values), for a report without the run dirs.

A run that saw each training item at most once also gets ``one_pass_loss`` (:func:`one_pass_loss`):
its mean language-model loss over the last fifth of its logged steps. Each of those batches was
scored before the model trained on it (progressive validation), so this is a held-out loss, and
far less noisy than an accuracy over a few hundred items. Lower is better (:data:`LOWER_IS_BETTER`).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from mola.sweep.runner import RunState
from mola.sweep.spec import SEED_KEY, Run
from mola.sweep.stats import t_interval, t_test_p

TIME_METRIC = "train_s"
ONE_PASS_LOSS = "one_pass_loss"
LOWER_IS_BETTER = frozenset({ONE_PASS_LOSS})
"""Metrics where a smaller value wins (for "seeds ahead" of a baseline)."""
TRAIN_LOG = "train_log.jsonl"
ONE_PASS_TAIL = 0.2
"""The share of the last logged steps :func:`one_pass_loss` averages."""


def one_pass_loss(output: str, tail: float = ONE_PASS_TAIL) -> float | None:
    """The mean ``lm_loss`` (``loss`` where a run logged no ``lm_loss``) of the logged steps after
    ``(1 - tail)`` of a run's last logged step, from its ``train_log.jsonl``.

    ``None`` when the log is missing or unreadable, has no loss, or the run went past one epoch
    (its later batches were seen before, so their loss is no longer a held-out one).
    """
    path = os.path.join(output, TRAIN_LOG)
    rows: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    if isinstance(row, dict):
                        rows.append(row)
    except (OSError, ValueError):
        return None
    losses: list[tuple[int, float, float]] = []
    for row in rows:
        step, loss = row.get("step"), row.get("lm_loss", row.get("loss"))
        if isinstance(step, int) and isinstance(loss, int | float):
            losses.append((step, float(loss), float(row.get("epoch") or 0.0)))
    if not losses or max(e for _, _, e in losses) > 1.0 + 1e-6:
        return None
    last = max(step for step, _, _ in losses)
    kept = [loss for step, loss, _ in losses if step > (1.0 - tail) * last]
    return statistics.fmean(kept)


def mean_of(values: list[float] | None) -> float | None:
    """The mean; ``None`` without values."""
    return statistics.fmean(values) if values else None


def std_of(values: list[float] | None) -> float | None:
    """The sample standard deviation; ``None`` with fewer than two values."""
    return statistics.stdev(values) if values and len(values) > 1 else None


@dataclass
class Group:
    """One row of the results table."""

    labels: dict[str, str]
    runs: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    trainable_params: int | None = None
    total_experts: int | None = None
    by_seed: dict[str, dict[str, float]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # seed -> run dir (per-item data)

    @property
    def n(self) -> int:
        return len(self.runs)

    def mean(self, metric: str) -> float | None:
        return mean_of(self.values.get(metric))

    def std(self, metric: str) -> float | None:
        return std_of(self.values.get(metric))


def run_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of one finished run that the table averages (not the item counts: ``n``, and
    ``<task>_n`` for a mixture)."""
    out = {
        k: float(v)
        for k, v in (metrics.get("fine_tuned") or {}).items()
        if not _is_count(k) and isinstance(v, int | float) and not isinstance(v, bool)
    }
    train_s = (metrics.get("timings") or {}).get(TIME_METRIC)
    if isinstance(train_s, int | float):
        out[TIME_METRIC] = float(train_s)
    return out


def _is_count(metric: str) -> bool:
    return metric == "n" or metric.endswith("_n")


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
        values = run_values(state.metrics)
        loss = one_pass_loss(run.output)
        if loss is not None:
            values[ONE_PASS_LOSS] = loss
        group.by_seed[group.seeds[-1]] = values
        group.outputs[group.seeds[-1]] = run.output
        for key, value in values.items():
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


@dataclass
class Paired:
    """One group against its baseline group, over the seeds both have finished."""

    labels: dict[str, str]
    baseline: dict[str, str]
    seeds: list[str]
    diffs: dict[str, list[float]]
    outputs: list[tuple[str, str, str]] = field(default_factory=list)
    """``(seed, this group's run dir, the baseline's run dir)`` where both are known."""

    def mean(self, metric: str) -> float | None:
        return mean_of(self.diffs.get(metric))

    def std(self, metric: str) -> float | None:
        return std_of(self.diffs.get(metric))

    def interval(self, metric: str) -> tuple[float, float] | None:
        """The 95% t-interval of the mean difference; ``None`` with fewer than two seeds."""
        return t_interval(self.diffs.get(metric) or [])

    def p_value(self, metric: str) -> float | None:
        """Two-sided paired t-test p-value of the mean difference; ``None`` with one seed."""
        return t_test_p(self.diffs.get(metric) or [])

    def resolved(self, metric: str) -> bool:
        """Whether the interval excludes zero."""
        ci = self.interval(metric)
        return ci is not None and (ci[0] > 0 or ci[1] < 0)

    def above(self, metric: str) -> int:
        """Seeds on which the group beat the baseline: a higher score, a lower
        :data:`LOWER_IS_BETTER` metric."""
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        return sum(1 for d in self.diffs.get(metric) or [] if sign * d > 0)


def parse_baseline(text: str, keys: list[str]) -> tuple[str, str]:
    """``KEY=VALUE`` (e.g. ``variant=square``) checked against the sweep's group keys.

    Raises:
        ValueError: not ``KEY=VALUE``, or KEY is not a group key (``seed`` cannot be one).
    """
    key, sep, value = text.partition("=")
    key, value = key.strip().replace("-", "_"), value.strip()
    if not sep or not key or not value or "," in value:
        raise ValueError(f"--baseline: expected KEY=VALUE (e.g. variant=square), got {text!r}")
    if key not in keys:
        raise ValueError(
            f"--baseline: unknown key {key!r}; the groups differ by {', '.join(keys) or 'nothing'}"
        )
    return key, value


def paired_differences(groups: list[Group], key: str, value: str) -> list[Paired]:
    """Each group (but the baseline's own) minus the group with ``key=value`` and its other
    labels, seed by seed; groups without a finished baseline seed in common are left out."""
    index = {tuple(sorted(g.labels.items())): g for g in groups}
    out: list[Paired] = []
    for group in groups:
        if group.labels.get(key) == value:
            continue
        wanted = {**group.labels, key: value}
        base = index.get(tuple(sorted(wanted.items())))
        if base is None:
            continue
        seeds = [s for s in group.seeds if s in base.by_seed]
        if not seeds:
            continue
        diffs: dict[str, list[float]] = {}
        for metric in group.values:
            if metric == TIME_METRIC:
                continue
            pairs = [
                (group.by_seed[s][metric], base.by_seed[s][metric])
                for s in seeds
                if metric in group.by_seed[s] and metric in base.by_seed[s]
            ]
            if len(pairs) == len(seeds):
                diffs[metric] = [a - b for a, b in pairs]
        outputs = [
            (s, group.outputs[s], base.outputs[s])
            for s in seeds
            if s in group.outputs and s in base.outputs
        ]
        out.append(Paired(dict(group.labels), base.labels, seeds, diffs, outputs))
    return out


def groups_from_results(data: dict[str, Any]) -> list[Group]:
    """The groups of a ``results.json`` (its ``groups``: labels, ``seeds`` and per-seed
    ``values``), in its order; no run dirs, so no per-item comparison.

    Raises:
        ValueError: not a results file (no ``groups`` with ``seeds`` and ``values``).
    """
    keys = data.get("group_keys")
    rows = data.get("groups")
    if not isinstance(keys, list) or not isinstance(rows, list):
        raise ValueError("not a mola sweep results.json (no group_keys and groups)")
    groups: list[Group] = []
    for row in rows:
        seeds, values = row.get("seeds"), row.get("values")
        if not isinstance(seeds, list) or not isinstance(values, dict):
            raise ValueError("not a mola sweep results.json (a group without seeds and values)")
        seeds = [str(s) for s in seeds]
        group = Group(
            labels={k: str(row[k]) for k in keys if k in row and k != SEED_KEY},
            runs=[str(r) for r in row.get("runs") or seeds],
            seeds=seeds,
            values={k: [float(v) for v in vs] for k, vs in values.items()},
            trainable_params=row.get("trainable_params"),
            total_experts=row.get("total_experts"),
        )
        for i, seed in enumerate(seeds):
            group.by_seed[seed] = {k: vs[i] for k, vs in group.values.items() if i < len(vs)}
        groups.append(group)
    return groups
