"""Examples, built-in tasks and user data files.

An :class:`Example` is either an *instruction* example (``instruction``, optional ``input``,
``output``) or a *multiple-choice* example, which additionally has ``choices`` and whose
``output`` is the text of the gold choice.

Built-in tasks are read from the data shipped in the ``evals`` package (OpenAI evals; it is
located with :func:`importlib.util.find_spec` and never imported):

* ``sarcasm``: news headlines, binary; choices ``["no", "yes"]`` ("yes" = sarcastic, index 1).
* ``siqa``: Social IQa, three answer texts per question.
* ``quartz``: QuaRTz science questions, two answer texts per question.
* ``logiqa``: LogiQA logical reasoning: a passage (the example's ``input``), a question and four
  answer texts.

Several built-in tasks joined by ``+`` (``sarcasm+siqa+quartz+logiqa``) are a mixture
(:mod:`mola.data.mixture`): trained on together, each scored on its own test split.

Splits are fixed and independent of any user seed: every source row is parsed (malformed rows
are skipped), exact duplicates are merged (duplicates that disagree on the answer are dropped
entirely), the remaining items are shuffled with the constant seed :data:`SPLIT_SEED`, and the
first :data:`TEST_SIZE` items form the ``test`` split, the rest the ``train`` split. The splits
are therefore disjoint and identical on every machine for a given ``evals`` release.

User files (JSON list of objects, JSONL, or CSV) are loaded with :func:`load_file`. A user file
has no splits: both ``"train"`` and ``"test"`` return every row, so pass a separate file for
evaluation. Every row is validated and problems are reported as :class:`DataError` with a
1-based line (JSONL), item (JSON) or row (CSV, data rows after the header) number.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mola.data.columns import map_columns
from mola.data.conversations import is_chat_row, parse_conversation
from mola.data.example import DataError, Example

TEST_SIZE = 500
"""Number of items in the fixed test split of every built-in task."""

SPLIT_SEED = 20240601
"""Constant seed of the shuffle that defines the built-in train/test splits."""

SPLITS = ("train", "test")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

SARCASM_INSTRUCTION = "Is this news headline sarcastic? Answer yes or no."


# --------------------------------------------------------------------------- built-in tasks

_Row = tuple[str, str, str, tuple[str, ...]]


def _evals_data_dir() -> Path:
    spec = importlib.util.find_spec("evals")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "built-in tasks need the 'evals' package: pip install --no-deps evals==3.0.1.post1"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "registry" / "data"


def _messages_text(record: Any) -> tuple[str, str] | None:
    """Return (last user message, ideal) of an evals record, or None if malformed."""
    if not isinstance(record, dict) or not isinstance(record.get("ideal"), str):
        return None
    messages = record.get("input")
    if not isinstance(messages, list):
        return None
    users = [
        m.get("content")
        for m in messages
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
    ]
    if not users:
        return None
    return users[-1].strip(), record["ideal"].strip()


def _letter_row(question: str, choices: list[str], ideal: str) -> _Row | None:
    choices = [c.strip() for c in choices]
    if not question or any(not c for c in choices) or len(set(choices)) != len(choices):
        return None
    if len(ideal) != 1 or ideal not in LETTERS[: len(choices)]:
        return None
    return (question, "", choices[LETTERS.index(ideal)], tuple(choices))


def _parse_sarcasm(record: Any) -> _Row | None:
    parsed = _messages_text(record)
    if parsed is None or not parsed[0] or parsed[1] not in ("0", "1"):
        return None
    headline, ideal = parsed
    choices = ("no", "yes")
    return (SARCASM_INSTRUCTION, headline, choices[int(ideal)], choices)


_SIQA_RE = re.compile(r"^(?P<q>.*?)\s*A: (?P<a>.*?); B: (?P<b>.*?); C: (?P<c>.*?)\.?\s*$", re.S)
_QUARTZ_RE = re.compile(r"^(?P<q>.*?)\s*\n\s*A: (?P<a>.*?)\n\s*B: (?P<b>.*?)\s*$", re.S)


def _parse_siqa(record: Any) -> _Row | None:
    parsed = _messages_text(record)
    match = _SIQA_RE.match(parsed[0]) if parsed else None
    if parsed is None or match is None:
        return None
    return _letter_row(match["q"].strip(), [match["a"], match["b"], match["c"]], parsed[1])


def _parse_quartz(record: Any) -> _Row | None:
    parsed = _messages_text(record)
    match = _QUARTZ_RE.match(parsed[0]) if parsed else None
    if parsed is None or match is None:
        return None
    return _letter_row(match["q"].strip(), [match["a"], match["b"]], parsed[1])


_LOGIQA_RE = re.compile(
    r"^\s*(?:Passage:\s*)?(?P<p>.*?)\s*Question:\s*(?P<q>.*?)\s*\nA\. (?P<a>.*?)\nB\. (?P<b>.*?)"
    r"\nC\. (?P<c>.*?)\nD\. (?P<d>.*?)\s*\nAnswer:\s*$",
    re.S,
)
_LETTER_PREFIX = re.compile(r"^[A-D]\.\s*")


def _parse_logiqa(record: Any) -> _Row | None:
    parsed = _messages_text(record)
    match = _LOGIQA_RE.match(parsed[0]) if parsed else None
    if parsed is None or match is None:
        return None
    # each option repeats its letter: "A. A.Zhao chose ..."
    choices = [_LETTER_PREFIX.sub("", match[k].strip()) for k in "abcd"]
    row = _letter_row(match["q"].strip(), choices, parsed[1])
    return None if row is None else (row[0], match["p"].strip(), row[2], row[3])


TASKS: dict[str, tuple[str, Callable[[Any], _Row | None]]] = {
    "sarcasm": ("sarcasm/samples.jsonl", _parse_sarcasm),
    "siqa": ("theory_of_mind/socialiqa/test.jsonl", _parse_siqa),
    "quartz": ("quartz/samples.jsonl", _parse_quartz),
    "logiqa": ("logiqa/logiqa.jsonl", _parse_logiqa),
}
"""Built-in task name -> (path under the evals data dir, row parser)."""


def _dedupe(rows: list[_Row]) -> list[_Row]:
    """Merge exact duplicates; drop every copy of a prompt whose answers disagree."""
    outputs: dict[tuple[str, str, tuple[str, ...]], set[str]] = {}
    for instruction, inp, output, choices in rows:
        outputs.setdefault((instruction, inp, choices), set()).add(output)
    kept = []
    for instruction, inp, output, choices in rows:
        answers = outputs.get((instruction, inp, choices))
        if answers is not None and len(answers) == 1:
            kept.append((instruction, inp, output, choices))
            del outputs[(instruction, inp, choices)]
    return kept


@functools.cache
def _task_splits(name: str) -> dict[str, tuple[_Row, ...]]:
    relpath, parser = TASKS[name]
    path = _evals_data_dir() / relpath
    rows: list[_Row] = []
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    row = parser(json.loads(line))
                except json.JSONDecodeError:
                    continue
                if row is not None:
                    rows.append(row)
    except OSError as exc:
        raise DataError(f"cannot read data of task '{name}': {path} ({exc.strerror})") from None
    rows = _dedupe(rows)
    random.Random(SPLIT_SEED).shuffle(rows)
    if len(rows) <= TEST_SIZE:
        raise DataError(f"task '{name}': only {len(rows)} usable items in {path}")
    return {"test": tuple(rows[:TEST_SIZE]), "train": tuple(rows[TEST_SIZE:])}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")


def load_task(name: str, split: str) -> list[Example]:
    """Load a split of a built-in task.

    Args:
        name: One of :data:`TASKS` (``sarcasm``, ``siqa``, ``quartz``, ``logiqa``), or several
            joined by ``+`` (:func:`mola.data.mixture.load_mixture`).
        split: ``"train"`` or ``"test"`` (the test split has :data:`TEST_SIZE` items).

    Returns:
        Fresh multiple-choice examples in a fixed order.

    Raises:
        DataError: Unknown task or split, or the ``evals`` package is missing.
    """
    if name not in TASKS:
        from mola.data.mixture import is_mixture, load_mixture

        if is_mixture(name):
            return load_mixture(name, split)
        raise DataError(f"unknown task '{name}' (choose from {', '.join(TASKS)})")
    _check_split(split)
    return [
        Example(instruction, inp, output, list(choices))
        for instruction, inp, output, choices in _task_splits(name)[split]
    ]


# --------------------------------------------------------------------------- user files


def _text(value: Any, field: str, where: str, *, required: bool) -> str:
    """Validate a text field; JSON numbers are accepted and converted to text."""
    if value is None:
        value = ""
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    elif not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return value


def _parse_choices(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: field 'choices' is not a valid JSON list ({exc.msg})"
                ) from None
        else:
            value = text.split("|")
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'choices' must be a list, got {type(value).__name__}")
    choices = [_text(c, "choices", where, required=True).strip() for c in value]
    if len(choices) < 2:
        raise DataError(f"{where}: field 'choices' needs at least 2 choices, got {len(choices)}")
    if len(choices) > len(LETTERS):
        raise DataError(f"{where}: field 'choices' has more than {len(LETTERS)} choices")
    seen: set[str] = set()
    for choice in choices:
        if choice in seen:
            raise DataError(f"{where}: duplicate choice {choice!r}")
        seen.add(choice)
    return choices


def _resolve_answer(answer: str, choices: list[str], where: str) -> str:
    """Map an answer given as choice text or letter to the choice text."""
    text = answer.strip()
    if text in choices:
        return text
    letter = text.rstrip(".)").lstrip("(").upper()
    if len(letter) == 1 and letter in LETTERS[: len(choices)]:
        return choices[LETTERS.index(letter)]
    raise DataError(f"{where}: answer {answer!r} is not one of the choices {choices}")


def _group(value: Any, where: str) -> int | None:
    """The optional ``group`` field: an int >= 0 (or empty)."""
    if value is None or value == "":
        return None
    try:
        group = int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field 'group' must be an integer >= 0, got {value!r}") from None
    if group < 0 or (isinstance(value, float) and value != group):
        raise DataError(f"{where}: field 'group' must be an integer >= 0, got {value!r}")
    return group


def _row_to_example(row: dict[str, Any], where: str) -> Example:
    """Validate one record in instruction, multiple-choice or chat form."""
    example = _row_to_example_fields(row, where)
    example.group = _group(row.get("group"), where)
    return example


def rows_to_examples(
    records: Iterable[tuple[str, dict[str, Any]]], columns: dict[str, str] | None = None
) -> list[Example]:
    """Validated examples of ``(where, row)`` records, columns renamed by ``columns``."""
    return [
        _row_to_example(map_columns(row, columns or {}, where), where) for where, row in records
    ]


def _row_to_example_fields(row: dict[str, Any], where: str) -> Example:
    if is_chat_row(row):
        return parse_conversation(row, where)
    if "question" in row or "choices" in row:
        for field in ("question", "choices", "answer"):
            if field not in row:
                raise DataError(f"{where}: missing field '{field}'")
        question = _text(row["question"], "question", where, required=True)
        choices = _parse_choices(row["choices"], where)
        answer = _text(row["answer"], "answer", where, required=True)
        context = _text(row.get("context"), "context", where, required=False)
        return Example(question, context, _resolve_answer(answer, choices, where), choices)
    if "instruction" in row or "output" in row:
        for field in ("instruction", "output"):
            if field not in row:
                raise DataError(f"{where}: missing field '{field}'")
        return Example(
            _text(row["instruction"], "instruction", where, required=True),
            _text(row.get("input"), "input", where, required=False),
            _text(row["output"], "output", where, required=True),
        )
    got = ", ".join(repr(k) for k in row) or "none"
    raise DataError(
        f"{where}: expected fields 'instruction' and 'output', 'question', 'choices' and "
        f"'answer', or 'messages'/'conversations' (got {got})"
    )


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None


def _object_or_error(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _json_records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path.name}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(items, list):
        raise DataError(f"{path.name}: expected a JSON list of objects, got {type(items).__name__}")
    for number, item in enumerate(items, start=1):
        where = f"{path.name} item {number}"
        yield where, _object_or_error(item, where)


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
        yield where, _object_or_error(item, where)


def _csv_records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        header = reader.fieldnames
        if not header:
            return
        width = len(header)
        for number, row in enumerate(reader, start=1):
            where = f"{path.name} row {number} (line {reader.line_num})"
            if None in row:
                raise DataError(f"{where}: expected {width} columns, got more")
            if any(value is None for value in row.values()):
                raise DataError(f"{where}: expected {width} columns, got fewer")
            if not any(value.strip() for value in row.values()):
                continue
            # Empty cells count as absent fields, so one CSV may mix both forms.
            yield where, {k.strip(): v for k, v in row.items() if v.strip()}
    except csv.Error as exc:
        raise DataError(f"{path.name} line {reader.line_num}: invalid CSV ({exc})") from None


_READERS = {
    ".json": _json_records,
    ".jsonl": _jsonl_records,
    ".ndjson": _jsonl_records,
    ".csv": _csv_records,
}


def load_file(path: str | Path, columns: dict[str, str] | None = None) -> list[Example]:
    """Load and validate a user data file.

    The format follows the extension: ``.json`` (a list of objects), ``.jsonl``/``.ndjson``
    (one object per line; blank lines are ignored) or ``.csv`` (header row required). Each
    record is in instruction form (``instruction``, optional ``input``, ``output``) or
    multiple-choice form (``question``, ``choices``, ``answer``, optional ``context``) or a
    conversation (``messages`` or ShareGPT ``conversations``, :mod:`mola.data.conversations`).
    ``choices`` is a list; in CSV a JSON list string or ``|``-separated text. ``answer`` is the
    right choice's text or its letter (``A``, ``B``, ...). Extra fields are ignored.

    Args:
        path: The data file.
        columns: ``{field: column}`` renames (``--data-columns``, :func:`parse_columns`).

    Returns:
        The examples in file order.

    Raises:
        DataError: The file is missing, unreadable or has an invalid record; the message names
            the file and the 1-based line/item/row number.
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path.name}: unsupported file type '{path.suffix}' (use .json, .jsonl or .csv)"
        )
    text = _read_text(path)
    examples = rows_to_examples(reader(path, text), columns)
    if not examples:
        raise DataError(f"{path.name}: no examples found")
    return examples


# --------------------------------------------------------------------------- entry points


def load_examples(task: str | None, data: str | Path | None, split: str) -> list[Example]:
    """Load examples for the CLI: a user file if given, else a built-in task split.

    A user file has no splits: ``split`` only selects the part of a built-in task, and a file
    returns all of its rows for both ``"train"`` and ``"test"``. Pass a separate file for
    evaluation.

    Args:
        task: Built-in task name, or ``None``.
        data: Path of a user data file, or ``None``. Takes precedence over ``task``.
        split: ``"train"`` or ``"test"``.

    Returns:
        The examples.

    Raises:
        DataError: Neither source given, or any loading error.
    """
    _check_split(split)
    if data is not None:
        return load_file(data)
    if task is not None:
        return load_task(task, split)
    raise DataError(f"no data: give a built-in task ({', '.join(TASKS)}) or a data file")


def limit_examples(examples: list[Example], limit: int | None) -> list[Example]:
    """Keep the first ``limit`` examples (all when ``limit`` is ``None``).

    Built-in splits are already shuffled with a fixed seed, so a prefix is a fixed random
    subset, comparable across runs.

    Raises:
        DataError: ``limit`` is below 1, or no examples remain.
    """
    if limit is not None:
        if limit < 1:
            raise DataError(f"example limit must be at least 1, got {limit}")
        examples = examples[:limit]
    if not examples:
        raise DataError("no examples left after filtering")
    return examples
