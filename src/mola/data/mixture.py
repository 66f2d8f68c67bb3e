"""A mixture of built-in tasks: ``--task sarcasm+siqa+quartz+logiqa``.

The training split of a mixture interleaves the tasks' training splits item by item, in the order
the tasks are named (one of each while every task has items left, then the rest of the longer
ones), so any prefix (``--train-limit``) holds the tasks in equal parts as far as they go. Its
test split is each task's fixed 500-item test split, one after the other; training scores each
task on its own (:func:`task_test_splits`), as ``<task>_<metric>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import zip_longest

from mola.data.datasets import TASKS, DataError, Example, load_task

SEPARATOR = "+"


def is_mixture(task: str) -> bool:
    return SEPARATOR in task


def task_names(task: str) -> list[str]:
    """The built-in tasks of ``task`` (one name, or several joined by ``+``).

    Raises:
        DataError: an unknown or repeated task, or an empty name.
    """
    names = [name.strip() for name in task.split(SEPARATOR)]
    for name in names:
        if name not in TASKS:
            where = f" in '{task}'" if is_mixture(task) else ""
            raise DataError(
                f"unknown task '{name or '(empty)'}'{where} (choose from {', '.join(TASKS)}, or "
                f"several joined by '{SEPARATOR}')"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"task '{task}' names {repeated[0]} twice")
    return names


def load_mixture(task: str, split: str) -> list[Example]:
    """A mixture's ``train`` split (the tasks interleaved) or ``test`` split (task after task)."""
    splits = [load_task(name, split) for name in task_names(task)]
    if split == "test":
        return [example for examples in splits for example in examples]
    return interleave(splits)


def interleave(splits: Iterable[list[Example]]) -> list[Example]:
    """One item of each split in turn while each has items left, then the rest of the longer."""
    return [example for group in zip_longest(*splits) for example in group if example is not None]


def task_test_splits(task: str, split: str = "test") -> dict[str, list[Example]]:
    """Each task's ``split`` (its test split by default), by task name (one entry for a single
    task)."""
    return {name: load_task(name, split) for name in task_names(task)}
