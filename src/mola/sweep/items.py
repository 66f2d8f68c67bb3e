"""Per-item paired comparison of two arms from the predictions their runs wrote.

Every evaluated run writes ``predictions_fine_tuned.jsonl``: one record per test item, in the
test split's fixed order, with ``correct`` (and ``task`` when the run scored several tasks). Two
runs of the same seed are compared item by item:

* McNemar (:func:`mola.sweep.stats.mcnemar_exact`) per seed: ``b`` items only this arm got
  right, ``c`` only the baseline; the exact two-sided p-value.
* A paired bootstrap (:func:`mola.sweep.stats.paired_bootstrap`) over the test items of the
  per-item difference averaged over the seeds (+1, 0 or -1 per seed): the 95% interval of the
  accuracy difference from the test set's sampling alone, these trained runs held fixed.

``accuracy`` compares all items; with per-task records, ``<task>_accuracy`` compares each task's
items on their own. Runs whose records do not line up (another count or other prompts) are left
out.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from mola.sweep.aggregate import Paired
from mola.sweep.stats import mcnemar_exact, paired_bootstrap

PREDICTIONS = "predictions_fine_tuned.jsonl"


@dataclass
class SeedTest:
    """One seed's McNemar test."""

    seed: str
    b: int  # right only in this arm
    c: int  # right only in the baseline
    p: float

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "b": self.b, "c": self.c, "p": self.p}


@dataclass
class ItemTest:
    """One metric's per-item comparison over the seeds with predictions on both sides."""

    items: int
    per_seed: list[SeedTest] = field(default_factory=list)
    mean: float = 0.0
    interval: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "seeds": [t.to_dict() for t in self.per_seed],
            "diff_mean": self.mean,
            "bootstrap_ci95": list(self.interval) if self.interval else None,
        }


def read_predictions(run_dir: str) -> list[dict[str, Any]] | None:
    """The run's per-item records (``None`` without a readable predictions file)."""
    path = os.path.join(run_dir, PREDICTIONS)
    try:
        with open(path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    if not records or not all(isinstance(r, dict) and "correct" in r for r in records):
        return None
    return records


def _lined_up(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x.get("prompt") == y.get("prompt") and x.get("task") == y.get("task")
        for x, y in zip(a, b, strict=True)
    )


_CACHE: dict[tuple[Any, ...], dict[str, ItemTest]] = {}


def _stamp(run_dir: str) -> tuple[int, int] | None:
    try:
        info = os.stat(os.path.join(run_dir, PREDICTIONS))
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def item_tests(paired: Paired) -> dict[str, ItemTest]:
    """Per-item comparison of ``paired``'s runs with its baseline's (empty without predictions).

    Keys: ``accuracy`` (all items), and ``<task>_accuracy`` for each task when the records carry
    one. Computed once per set of prediction files (the Markdown and JSON reports share it).
    """
    key = tuple((s, a, b, _stamp(a), _stamp(b)) for s, a, b in paired.outputs)
    if key not in _CACHE:
        _CACHE[key] = _item_tests(paired)
    return _CACHE[key]


def _item_tests(paired: Paired) -> dict[str, ItemTest]:
    pairs: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = []
    for seed, mine, base in paired.outputs:
        a, b = read_predictions(mine), read_predictions(base)
        if a is not None and b is not None and _lined_up(a, b):
            pairs.append((seed, a, b))
    if not pairs or any(len(a) != len(pairs[0][1]) for _, a, _ in pairs):
        return {}
    first = pairs[0][1]
    subsets: dict[str, list[int]] = {"accuracy": list(range(len(first)))}
    tasks = [r.get("task") for r in first]
    if any(t is not None for t in tasks):
        for task in dict.fromkeys(t for t in tasks if t is not None):
            subsets[f"{task}_accuracy"] = [i for i, t in enumerate(tasks) if t == task]
    out: dict[str, ItemTest] = {}
    for metric, index in subsets.items():
        test = ItemTest(items=len(index))
        per_item = [0.0] * len(index)
        for seed, a, b in pairs:
            right_a = [bool(a[i]["correct"]) for i in index]
            right_b = [bool(b[i]["correct"]) for i in index]
            only_a = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
            only_b = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
            test.per_seed.append(SeedTest(seed, only_a, only_b, mcnemar_exact(only_a, only_b)))
            for j, (x, y) in enumerate(zip(right_a, right_b, strict=True)):
                per_item[j] += (int(x) - int(y)) / len(pairs)
        test.mean = statistics.fmean(per_item)
        test.interval = paired_bootstrap(per_item)
        out[metric] = test
    return out
