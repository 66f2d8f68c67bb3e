"""Tests for mola.data: user files, validation messages, built-in task splits."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest

from mola.data import datasets as data
from mola.data.datasets import (
    TEST_SIZE,
    DataError,
    Example,
    limit_examples,
    load_examples,
    load_file,
)

INSTRUCTION_ROWS = [
    {"instruction": "Name a fruit.", "output": "apple"},
    {"instruction": "Translate to French.", "input": "hello world", "output": "bonjour le monde"},
]
INSTRUCTION_EXPECTED = [
    Example("Name a fruit.", "", "apple"),
    Example("Translate to French.", "hello world", "bonjour le monde"),
]
CHOICE_ROWS = [
    {"question": "What color is the sky?", "choices": ["blue", "green"], "answer": "blue"},
    {
        "question": "How would Alex feel?",
        "choices": ["happy", "sad", "angry"],
        "answer": "C",
        "context": "Alex lost the game.",
    },
]
CHOICE_EXPECTED = [
    Example("What color is the sky?", "", "blue", ["blue", "green"]),
    Example("How would Alex feel?", "Alex lost the game.", "angry", ["happy", "sad", "angry"]),
]


def write_rows(path: Path, rows: list[dict], *, pipe_choices: bool = False) -> Path:
    """Write rows as JSON, JSONL or CSV according to the suffix of ``path``."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                row = dict(row)
                if isinstance(row.get("choices"), list):
                    choices = row["choices"]
                    row["choices"] = "|".join(choices) if pipe_choices else json.dumps(choices)
                writer.writerow(row)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
@pytest.mark.parametrize(
    ("rows", "expected"),
    [(INSTRUCTION_ROWS, INSTRUCTION_EXPECTED), (CHOICE_ROWS, CHOICE_EXPECTED)],
    ids=["instruction", "choice"],
)
def test_load_file_formats_and_forms(tmp_path, suffix, rows, expected):
    path = write_rows(tmp_path / f"data{suffix}", rows)
    assert load_file(path) == expected


def test_csv_pipe_separated_choices(tmp_path):
    path = write_rows(tmp_path / "data.csv", CHOICE_ROWS, pipe_choices=True)
    assert load_file(path) == CHOICE_EXPECTED


def test_answer_letter_variants_and_numbers(tmp_path):
    rows = [
        {"question": "q1", "choices": ["x", "y"], "answer": "b"},
        {"question": "q2", "choices": ["x", "y"], "answer": "(A)"},
        {"question": "q3", "choices": [1, 2, 3], "answer": 2},
        {"question": "q4", "choices": ["A", "B"], "answer": "B"},
    ]
    got = load_file(write_rows(tmp_path / "d.json", rows))
    assert [ex.output for ex in got] == ["y", "x", "2", "B"]
    assert [ex.label for ex in got] == [1, 0, 1, 1]


def test_blank_lines_and_rows_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"instruction": "a", "output": "b"}\n\n', encoding="utf-8")
    assert len(load_file(path)) == 1
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\na,b\n,\n", encoding="utf-8")
    assert len(load_file(path)) == 1


def test_mixed_forms_in_one_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'instruction,output,question,choices,answer\na,b,,,\n,,q,"x|y",y\n', encoding="utf-8"
    )
    assert load_file(path) == [Example("a", "", "b"), Example("q", "", "y", ["x", "y"])]


def test_example_label():
    assert Example("q", output="b", choices=["a", "b"]).label == 1
    assert Example("q", output="c", choices=["a", "b"]).label is None
    assert Example("q", output="a").label is None


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "data.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n',
            "data.jsonl line 2: invalid JSON (Expecting ',' delimiter)",
        ),
        ("data.jsonl", '{"instruction": "a", "output": "b"}\n[1, 2]\n', "line 2: expected a JSON"),
        ("data.json", '[{"instruction": "a", "output": "b"}', "data.json: invalid JSON"),
        ("data.json", '{"instruction": "a"}', "expected a JSON list of objects, got dict"),
        ("data.json", "[]", "data.json: no examples found"),
        (
            "data.csv",
            "question,choices,answer\nq,x|y,x\nq,x|y,y\nq,x|y,\n",
            "data.csv row 3 (line 4): missing field 'answer'",
        ),
        (
            "data.csv",
            "question,choices\nq,x|y\n",
            "data.csv row 1 (line 2): missing field 'answer'",
        ),
        ("data.csv", "instruction,output\na,b\na,b,c\n", "row 2 (line 3): expected 2 columns"),
        ("data.csv", "instruction,output\na,b\nc\n", "row 2 (line 3): expected 2 columns"),
        (
            "data.json",
            json.dumps(
                [CHOICE_ROWS[0]] * 3 + [{"question": "q", "choices": ["x", "y"], "answer": "D"}]
            ),
            "data.json item 4: answer 'D' is not one of the choices ['x', 'y']",
        ),
        (
            "data.json",
            json.dumps([{"question": "q", "choices": ["x"], "answer": "x"}]),
            "item 1: field 'choices' needs at least 2 choices",
        ),
        (
            "data.json",
            json.dumps([{"question": "q", "choices": ["x", "x"], "answer": "x"}]),
            "item 1: duplicate choice 'x'",
        ),
        (
            "data.json",
            json.dumps([{"question": "q", "choices": "[1, ", "answer": "x"}]),
            "item 1: field 'choices' is not a valid JSON list",
        ),
        (
            "data.json",
            json.dumps([{"question": "q", "choices": {"a": 1}, "answer": "x"}]),
            "item 1: field 'choices' must be a list, got dict",
        ),
        (
            "data.json",
            json.dumps([INSTRUCTION_ROWS[0], {"instruction": ["a"], "output": "b"}]),
            "item 2: field 'instruction' must be a string, got list",
        ),
        (
            "data.jsonl",
            json.dumps({"instruction": " ", "output": "b"}),
            "line 1: field 'instruction' is empty",
        ),
        ("data.jsonl", json.dumps({"instruction": "a"}), "line 1: missing field 'output'"),
        ("data.jsonl", json.dumps({"prompt": "a"}), "line 1: expected fields 'instruction'"),
        ("data.txt", "hello", "unsupported file type '.txt'"),
    ],
)
def test_load_file_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_file(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_unreadable_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_file(tmp_path / "nope.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_file(tmp_path / "dir.json")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_file(binary)
    if os.name == "posix" and os.geteuid() != 0:
        locked = write_rows(tmp_path / "locked.json", INSTRUCTION_ROWS)
        locked.chmod(0)
        with pytest.raises(DataError, match="cannot read file"):
            load_file(locked)


def test_load_examples_file_wins_and_errors(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", INSTRUCTION_ROWS)
    for split in ("train", "test"):
        assert load_examples("no-such-task", str(path), split) == INSTRUCTION_EXPECTED
    with pytest.raises(DataError, match="no data"):
        load_examples(None, None, "train")
    with pytest.raises(
        DataError, match=r"unknown task 'foo' \(choose from sarcasm, siqa, quartz, logiqa\)"
    ):
        load_examples("foo", None, "train")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_examples(None, str(path), "dev")


def test_limit_examples():
    examples = [Example(str(i), output="x") for i in range(5)]
    assert limit_examples(examples, None) == examples
    assert limit_examples(examples, 2) == examples[:2]
    with pytest.raises(DataError, match="no examples left after filtering"):
        limit_examples([], None)
    with pytest.raises(DataError, match="at least 1"):
        limit_examples(examples, 0)


# --------------------------------------------------------------------------- built-in tasks

needs_evals = pytest.mark.skipif(
    importlib.util.find_spec("evals") is None, reason="the 'evals' package is not installed"
)


@needs_evals
@pytest.mark.parametrize(("task", "num_choices"), [("sarcasm", 2), ("siqa", 3), ("quartz", 2)])
def test_builtin_task_splits(task, num_choices):
    test = load_examples(task, None, "test")
    train = load_examples(task, None, "train")
    assert len(test) == TEST_SIZE
    assert len(train) > TEST_SIZE
    key = lambda ex: (ex.instruction, ex.input, tuple(ex.choices))  # noqa: E731
    assert not {key(ex) for ex in test} & {key(ex) for ex in train}
    assert len({key(ex) for ex in train}) == len(train)
    for ex in test + train:
        assert len(ex.choices) == num_choices
        assert ex.label is not None and ex.instruction
    data._task_splits.cache_clear()
    assert load_examples(task, None, "test") == test  # deterministic, fresh read
    test[0].choices.append("mutated")
    assert load_examples(task, None, "test")[0].choices != test[0].choices


@needs_evals
def test_builtin_task_contents():
    sarcasm = load_examples("sarcasm", None, "test")
    assert all(ex.choices == ["no", "yes"] and ex.input for ex in sarcasm)
    assert {ex.label for ex in sarcasm} == {0, 1}
    siqa = load_examples("siqa", None, "test")
    assert all(" A: " not in ex.instruction and ex.instruction.endswith("?") for ex in siqa[:50])
    quartz = load_examples("quartz", None, "test")
    assert all("\n" not in ex.instruction for ex in quartz)


def _quartz_line(question: str, a: str, b: str, ideal: str) -> str:
    record = {
        "input": [
            {"role": "system", "content": "Answer with the letter."},
            {"role": "user", "content": f"{question}\n\n A: {a}\n B: {b}"},
        ],
        "ideal": ideal,
    }
    return json.dumps(record) + "\n"


def test_task_loader_skips_malformed_and_dedupes(tmp_path, monkeypatch):
    source = tmp_path / "quartz" / "samples.jsonl"
    source.parent.mkdir()
    lines = [
        _quartz_line(f"Question {i} goes", "up", "down", "AB"[i % 2]) for i in range(TEST_SIZE)
    ]
    lines += [_quartz_line("Question 0 goes", "up", "down", "A")] * 3  # duplicates: merged
    lines += [
        _quartz_line("Conflict", "up", "down", "A"),
        _quartz_line("Conflict", "up", "down", "B"),
    ]
    lines += ["{not json\n", '{"input": "x", "ideal": "A"}\n', "[]\n"]
    lines += [_quartz_line("Bad letter", "up", "down", "C"), _quartz_line("Same", "up", "up", "A")]
    lines += [
        json.dumps({"input": [{"role": "user", "content": "no choices"}], "ideal": "A"}) + "\n"
    ]
    lines += [_quartz_line(f"Extra {i}", "more", "less", "A") for i in range(7)]
    source.write_text("".join(lines), encoding="utf-8")
    monkeypatch.setattr(data, "_evals_data_dir", lambda: tmp_path)
    data._task_splits.cache_clear()
    try:
        test, train = data.load_task("quartz", "test"), data.load_task("quartz", "train")
    finally:
        data._task_splits.cache_clear()
    assert len(test) == TEST_SIZE and len(train) == 7
    questions = [ex.instruction for ex in test + train]
    assert len(set(questions)) == len(questions)
    assert "Conflict" not in questions
    assert {ex.output for ex in test + train} == {"up", "down", "more"}
