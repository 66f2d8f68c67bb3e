"""Every place ``--data`` can point at: files, Parquet, ``save_to_disk`` directories, the Hub.

* ``.json`` / ``.jsonl`` / ``.csv``: :func:`mola.data.datasets.load_file`.
* ``.parquet``: read with ``pyarrow``; rows are numbered from 1 in file order.
* a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
  whose split ``--data-split`` picks).
* any other directory, or a Hub dataset id ``ORG/NAME``: ``datasets.load_dataset`` with
  ``--data-config`` as its configuration name and ``--data-split`` as its split, through the
  ``datasets`` cache (``HF_HUB_OFFLINE=1`` reads only what is cached).

Every row goes through the same validation as a JSON row, after ``--data-columns`` renamed the
columns (``question=query,answer=label``), so a bad row fails with one line naming the source,
the row and the field. ``pyarrow`` and ``datasets`` are optional (``pip install
'mola-lora[datasets]'``); a source that needs them says so when they are missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mola.data.columns import parse_columns
from mola.data.datasets import (
    TASKS,
    Example,
    _check_split,
    load_file,
    load_task,
    rows_to_examples,
)
from mola.data.example import DataError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""``ORG/NAME`` of a Hub dataset."""

INSTALL = "pip install 'mola-lora[datasets]'"
SAVE_TO_DISK_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def _need(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DataError(f"{what} needs the '{module}' package: {INSTALL}")


def _rows(table_rows: Any, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, row in enumerate(table_rows, start=1):
        yield f"{name} row {number}", dict(row)


def _check_columns(names: list[str], columns: dict[str, str], where: str) -> None:
    """Name a missing mapped column once, before any row is read."""
    for field, column in columns.items():
        if column not in names:
            raise DataError(
                f"{where}: no column {column!r} (--data-columns {field}={column}; "
                f"columns: {', '.join(names) or 'none'})"
            )


def _examples(rows: Any, names: list[str], columns: dict[str, str], where: str) -> list[Example]:
    _check_columns(names, columns, where)
    examples = rows_to_examples(_rows(rows, where), columns)
    if not examples:
        raise DataError(f"{where}: no examples found")
    return examples


def _parquet(path: Path, columns: dict[str, str]) -> list[Example]:
    _need("pyarrow", "reading Parquet")
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors: ArrowInvalid, OSError, ...
        raise DataError(f"{path.name}: not a readable Parquet file ({_first_line(err)})") from None
    return _examples(table.to_pylist(), table.column_names, columns, path.name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _pick_split(data: Any, split: str | None, where: str) -> tuple[Any, str]:
    """A ``Dataset`` out of a ``DatasetDict`` (by ``split``), or the dataset itself."""
    import datasets

    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return data, where
    splits = list(data.keys())
    if split is None:
        split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
    if split not in splits:
        raise DataError(
            f"{where}: no split {split!r} (splits: {', '.join(splits)})"
            if split
            else f"{where}: choose a split with --data-split ({', '.join(splits)})"
        )
    return data[split], f"{where}[{split}]"


def _saved_dataset(path: Path, split: str | None, columns: dict[str, str]) -> list[Example]:
    _need("datasets", "a save_to_disk directory")
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError, json errors, arrow errors
        raise DataError(
            f"{path}: not a readable save_to_disk directory ({_first_line(err)})"
        ) from None
    data, where = _pick_split(data, split, path.name)
    return _examples(data, list(data.column_names), columns, where)


def _load_dataset(
    source: str, split: str | None, config: str | None, columns: dict[str, str]
) -> list[Example]:
    _need("datasets", f"the dataset {source}")
    import datasets

    name = Path(source).name if os.path.isdir(source) else source
    try:
        data = datasets.load_dataset(source, name=config, split=split)
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as err:
        offline = " (HF_HUB_OFFLINE is set: only cached datasets load)" if _offline() else ""
        raise DataError(f"{name}: cannot load the dataset{offline}: {_first_line(err)}") from None
    data, where = _pick_split(data, split, name)
    if split is not None:
        where = f"{name}[{split}]"
    return _examples(data, list(data.column_names), columns, where)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_data(
    source: str | Path,
    *,
    split: str | None = None,
    config: str | None = None,
    columns: str | dict[str, str] | None = None,
) -> list[Example]:
    """Examples of a user data source: a file, a ``save_to_disk`` directory or a Hub dataset.

    Args:
        source: A ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a directory, or ``ORG/NAME``.
        split: The split of a dataset with several (``--data-split``; default ``train`` when
            the dataset has one).
        config: The configuration name of a ``load_dataset`` dataset (``--data-config``).
        columns: ``--data-columns``: ``"field=column,..."`` or a ``{field: column}`` mapping.

    Raises:
        DataError: a missing source or package, an unknown split or column, or a bad row (the
            message names the source, the row and the field).
    """
    mapping = parse_columns(columns)
    text = str(source)
    path = Path(text)
    if path.is_dir():
        if any((path / name).is_file() for name in SAVE_TO_DISK_FILES):
            return _saved_dataset(path, split, mapping)
        return _load_dataset(text, split, config, mapping)
    if path.suffix.lower() == ".parquet":
        return _parquet(path, mapping)
    if not path.exists() and not path.suffix and HUB_ID.match(text):
        return _load_dataset(text, split, config, mapping)
    return load_file(path, mapping)


def load_examples(
    task: str | None,
    data: str | Path | None,
    split: str,
    *,
    data_split: str | None = None,
    data_config: str | None = None,
    data_columns: str | dict[str, str] | None = None,
) -> list[Example]:
    """:func:`mola.data.datasets.load_examples` for every source :func:`load_data` reads.

    ``split`` selects the part of a built-in task; ``data_split`` that of a data set with
    splits (default: ``train``).
    """
    _check_split(split)
    if data is not None:
        return load_data(data, split=data_split, config=data_config, columns=data_columns)
    if task is not None:
        return load_task(task, split)
    raise DataError(f"no data: give a built-in task ({', '.join(TASKS)}) or a data file")
