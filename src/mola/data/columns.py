"""``--data-columns``: rename a data set's columns to the fields mola reads."""

from __future__ import annotations

from typing import Any

from mola.data.example import DataError

FIELDS = (
    "instruction",
    "input",
    "output",
    "question",
    "choices",
    "answer",
    "context",
    "group",
    "messages",
    "conversations",
)
"""The fields a data row may have, the targets of ``--data-columns``."""


def parse_columns(text: str | dict[str, str] | None) -> dict[str, str]:
    """``--data-columns question=q,answer=label`` as ``{mola field: column}``.

    Raises:
        DataError: not ``FIELD=COLUMN`` pairs, or an unknown or repeated field.
    """
    if not text:
        return {}
    if isinstance(text, dict):
        pairs = list(text.items())
    else:
        pairs = []
        for item in str(text).split(","):
            field, sep, column = item.partition("=")
            if not sep or not field.strip() or not column.strip():
                raise DataError(
                    f"--data-columns: {item.strip()!r} is not FIELD=COLUMN "
                    "(e.g. question=query,answer=label)"
                )
            pairs.append((field.strip(), column.strip()))
    mapping: dict[str, str] = {}
    for field, column in pairs:
        if field not in FIELDS:
            raise DataError(
                f"--data-columns: unknown field {field!r} (fields: {', '.join(FIELDS)})"
            )
        if field in mapping:
            raise DataError(f"--data-columns: field {field!r} given twice")
        mapping[field] = str(column)
    return mapping


def map_columns(row: dict[str, Any], columns: dict[str, str], where: str) -> dict[str, Any]:
    """The row with each mapped column renamed to its mola field (other columns kept)."""
    if not columns:
        return row
    for field, column in columns.items():
        if column not in row:
            raise DataError(
                f"{where}: no column {column!r} (--data-columns {field}={column}; "
                f"columns: {', '.join(map(str, row)) or 'none'})"
            )
    renamed = {k: v for k, v in row.items() if k not in columns.values() and k not in columns}
    renamed.update({field: row[column] for field, column in columns.items()})
    return renamed
