"""Parquet files, save_to_disk directories, load_dataset sources and --data-columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mola.data.columns import parse_columns
from mola.data.datasets import DataError, Example
from mola.data.sources import load_data

pyarrow = pytest.importorskip("pyarrow", reason="needs pyarrow: pip install 'mola-lora[datasets]'")
datasets = pytest.importorskip(
    "datasets", reason="needs datasets: pip install 'mola-lora[datasets]'"
)

# Columns named as a typical Hub data set names them, not as mola does.
ROWS = [
    {"query": "Is the sky blue?", "options": ["yes", "no"], "label": "A", "id": 1},
    {"query": "Is a brick light?", "options": ["yes", "no"], "label": "B", "id": 2},
]
COLUMNS = "question=query,choices=options,answer=label"
EXPECTED = [
    Example("Is the sky blue?", "", "yes", ["yes", "no"]),
    Example("Is a brick light?", "", "no", ["yes", "no"]),
]
CHAT = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def test_parquet_with_column_mapping(tmp_path):
    path = write_parquet(tmp_path / "mc.parquet", ROWS)
    assert load_data(path, columns=COLUMNS) == EXPECTED
    assert load_data(path, columns={"question": "query", "choices": "options", "answer": "label"})


def test_parquet_chat_rows(tmp_path):
    (example,) = load_data(write_parquet(tmp_path / "chat.parquet", CHAT))
    assert example.messages == CHAT[0]["messages"] and example.output == "Hello"


def test_parquet_errors_name_file_row_and_field(tmp_path):
    path = write_parquet(tmp_path / "mc.parquet", ROWS)
    with pytest.raises(DataError, match=r"^mc.parquet: no column 'answer_text' \(--data-columns"):
        load_data(path, columns="question=query,choices=options,answer=answer_text")
    bad = write_parquet(tmp_path / "bad.parquet", [ROWS[0], {**ROWS[1], "label": "D"}])
    with pytest.raises(DataError, match=r"^bad.parquet row 2: answer 'D' is not one of"):
        load_data(bad, columns=COLUMNS)
    with pytest.raises(DataError, match=r"^mc.parquet row 1: expected fields 'instruction'"):
        load_data(path)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"^junk.parquet: not a readable Parquet file"):
        load_data(tmp_path / "junk.parquet")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert load_data(single, columns=COLUMNS) == EXPECTED
    both = tmp_path / "both"
    splits = {"train": ROWS, "test": ROWS[:1]}
    datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in splits.items()}
    ).save_to_disk(str(both))
    assert load_data(both, columns=COLUMNS) == EXPECTED  # train by default
    assert load_data(both, split="test", columns=COLUMNS) == EXPECTED[:1]
    with pytest.raises(DataError, match=r"^both: no split 'validation' \(splits: train, test\)"):
        load_data(both, split="validation", columns=COLUMNS)
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([{**ROWS[0], "options": ["yes"]}]).save_to_disk(str(bad))
    with pytest.raises(DataError, match=r"^bad row 1: field 'choices' needs at least 2"):
        load_data(bad, columns=COLUMNS)


def test_load_dataset_directory_with_split_and_config(tmp_path):
    """A directory of data files goes through datasets.load_dataset, as a Hub id does."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "test.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    assert load_data(root, columns=COLUMNS) == EXPECTED
    assert load_data(root, split="test", columns=COLUMNS) == EXPECTED[1:]
    with pytest.raises(DataError, match=r"^repo: cannot load the dataset: .*validation"):
        load_data(root, split="validation", columns=COLUMNS)


def test_hub_id_offline_is_one_line(tmp_path):
    """HF_HUB_OFFLINE=1 and nothing cached: a one-line error naming the id (no network)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
    }
    code = (
        "from mola.data.sources import load_data\n"
        "try:\n    load_data('mola-test-org/no-such-set', split='train')\n"
        "except ValueError as err:\n    print(err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    line = out.stdout.strip()
    assert line.startswith("mola-test-org/no-such-set: cannot load the dataset (HF_HUB_OFFLINE")
    assert "\n" not in line


def test_data_columns_parsing():
    assert parse_columns("question=q, answer=a") == {"question": "q", "answer": "a"}
    assert parse_columns(None) == {}
    with pytest.raises(DataError, match="'question' is not FIELD=COLUMN"):
        parse_columns("question")
    with pytest.raises(DataError, match="unknown field 'prompt'"):
        parse_columns("prompt=x")
    with pytest.raises(DataError, match="given twice"):
        parse_columns("answer=a,answer=b")


def test_columns_map_json_files_too(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert load_data(path, columns=COLUMNS) == EXPECTED
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"query": "x"}) + "\n")
    with pytest.raises(DataError, match=r"^mc.jsonl line 2: no column 'options'"):
        load_data(path, columns=COLUMNS)


def test_eval_cli_bad_parquet_row_is_one_line_exit_2(tmp_path, capsys):
    from mola.cli import main

    bad = write_parquet(tmp_path / "bad.parquet", [ROWS[0], {**ROWS[1], "label": "D"}])
    args = ["eval", "--data", str(bad), "--data-columns", COLUMNS]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"mola: error: bad.parquet row 2: answer 'D' is not one of the choices {['yes', 'no']}"
    ]


def test_train_cli_on_save_to_disk_split(tiny_llama_dir, tmp_path):
    from mola.cli import main

    saved = tmp_path / "saved"
    splits = {"train": ROWS * 2, "test": ROWS}
    datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in splits.items()}
    ).save_to_disk(str(saved))
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(saved), "--eval-data"]
    args += [str(saved), "--data-columns", COLUMNS, "--max-steps", "1", "--save-steps", "0"]
    args += ["--experts", "2", "--r", "2", "--batch-size", "2", "--output", str(out)]
    assert main([*args, "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fine_tuned"]["n"] == 2  # the test split
    assert metrics["options"]["data_columns"] == COLUMNS
