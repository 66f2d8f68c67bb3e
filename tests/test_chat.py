"""Chat data: the two row forms, assistant-only token masks, truncation, the CLI default."""

from __future__ import annotations

import json

import pytest
from conftest import CHAT_TEMPLATE, build_tiny_tokenizer

from mola.data.conversations import encode_conversation, segments
from mola.data.datasets import DataError, load_file
from mola.data.prompts import (
    IGNORE_INDEX,
    default_template,
    encode_for_training,
    encode_training_set,
    render_prompt,
)

# The SmolLM2 / Qwen style: a default system turn when the conversation brings none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" + CHAT_TEMPLATE
)

TURNS = [
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "apple"},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "banana"},
]
SYSTEM = {"role": "system", "content": "Answer briefly."}
SHAREGPT = [
    {"from": "human", "value": "Name a fruit."},
    {"from": "gpt", "value": "apple"},
    {"from": "human", "value": "Another one?"},
    {"from": "gpt", "value": "banana"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tok_default_system():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hand_built(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(input ids, labels) from text pieces written out by hand: True = assistant target."""
    input_ids, labels = [], []
    for text, target in pieces:
        piece = ids(tokenizer, text)
        input_ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    return input_ids, labels


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_masks_every_assistant_turn_without_system(tok, tmp_path):
    (example,) = load_file(write_jsonl(tmp_path / "c.jsonl", [{"messages": TURNS}]))
    row = encode_for_training(tok, example, "chat", cutoff_len=512)
    expected_ids, expected_labels = hand_built(
        tok,
        [
            ("<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n", False),
            ("apple<|im_end|>", True),
            ("\n<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n", False),
            ("banana<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert row["input_ids"] == expected_ids
    assert row["labels"] == expected_labels
    assert row["attention_mask"] == [1] * len(expected_ids)
    targets = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tok.decode(targets) == "apple<|im_end|>banana<|im_end|>"
    # the pieces put together are exactly what the template renders
    full = tok.apply_chat_template(TURNS, tokenize=False)
    assert "".join(text for text, _ in segments(tok, TURNS)) == full


def test_masks_with_system_prompt(tok):
    example = load_row({"messages": [SYSTEM, *TURNS]})
    row = encode_for_training(tok, example, "chat", cutoff_len=512)
    expected_ids, expected_labels = hand_built(
        tok,
        [
            (
                "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("apple<|im_end|>", True),
            ("\n<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n", False),
            ("banana<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (row["input_ids"], row["labels"]) == (expected_ids, expected_labels)


def test_template_with_a_default_system_prompt(tok_default_system):
    example = load_row({"messages": TURNS})
    row = encode_for_training(tok_default_system, example, "chat", cutoff_len=512)
    expected = hand_built(
        tok_default_system,
        [
            (
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("apple<|im_end|>", True),
            ("\n<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n", False),
            ("banana<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (row["input_ids"], row["labels"]) == expected
    # a system turn of the data replaces the template's default
    with_system = encode_for_training(
        tok_default_system, load_row({"messages": [SYSTEM, *TURNS]}), "chat", cutoff_len=512
    )
    assert "helpful" not in tok_default_system.decode(with_system["input_ids"])


def load_row(row: dict):
    from mola.data.datasets import _row_to_example

    return _row_to_example(row, "row 1")


def test_sharegpt_equals_messages(tok, tmp_path):
    a = load_file(write_jsonl(tmp_path / "m.jsonl", [{"messages": TURNS}]))[0]
    b = load_file(write_jsonl(tmp_path / "s.jsonl", [{"conversations": SHAREGPT}]))[0]
    assert a.messages == b.messages
    assert encode_for_training(tok, a, "chat") == encode_for_training(tok, b, "chat")
    assert (a.instruction, a.output) == ("Name a fruit.", "banana")


def test_train_on_inputs_labels_everything(tok):
    row = encode_for_training(tok, load_row({"messages": TURNS}), "chat", 512, True)
    assert row["labels"] == row["input_ids"]


def test_prompt_is_the_context_of_the_last_reply(tok):
    prompt = render_prompt(load_row({"messages": TURNS}), "chat", tok)
    assert prompt == tok.apply_chat_template(TURNS[:3], tokenize=False, add_generation_prompt=True)


def test_chat_is_the_default_template_for_chat_data(tok):
    chat = load_row({"messages": TURNS})
    plain = load_row({"instruction": "a", "output": "b"})
    assert default_template([plain]) == "alpaca"
    assert default_template([plain, chat]) == "chat"
    with pytest.raises(DataError, match="use --template chat"):
        encode_for_training(tok, chat, "alpaca")


def test_truncation_reports_conversations_without_assistant_tokens(tok):
    long_user = {"role": "user", "content": "The cat sat on the mat. " * 20}
    lost = load_row({"messages": [long_user, {"role": "assistant", "content": "yes"}]})
    kept = load_row({"messages": TURNS})
    first_reply = len(
        ids(tok, "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n")
    )
    cutoff = first_reply + 3
    said: list[str] = []
    rows = encode_training_set(tok, [lost, kept, lost], "chat", cutoff, warn=said.append)
    assert len(rows) == 1 and len(rows[0]["input_ids"]) == cutoff
    assert sum(t != IGNORE_INDEX for t in rows[0]["labels"]) == 3  # "apple<|im_end|>" cut
    assert said == [
        f"mola: warning: --cutoff-len {cutoff} cut 3 conversations; 2 of them kept no "
        "assistant token (left out); raise --cutoff-len to train on them"
    ]
    said.clear()
    rows = encode_training_set(tok, [lost, kept], "chat", cutoff, True, warn=said.append)
    assert len(rows) == 2 and "kept for their other tokens" in said[0]
    with pytest.raises(DataError, match="no conversation keeps an assistant token"):
        encode_training_set(tok, [lost], "chat", cutoff, warn=said.append)
    encoded = encode_conversation(tok, lost, cutoff)
    assert encoded.truncated and encoded.assistant_tokens == 0


def test_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{{ messages|length }}" + CHAT_TEMPLATE
    with pytest.raises(DataError, match="changes earlier turns"):
        encode_for_training(tokenizer, load_row({"messages": TURNS}), "chat")


def test_no_chat_template():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        encode_for_training(tokenizer, load_row({"messages": TURNS}), "chat")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": "hi"}, "line 1: field 'messages' must be a list, got str"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "line 1: field 'messages' turn 1: unknown role 'bot'",
        ),
        (
            {"conversations": [{"from": "human"}]},
            "line 1: field 'conversations' turn 1: missing 'value'",
        ),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "turn 1: 'content' must be a string, got int",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn with text"),
        (
            {"messages": [TURNS[0], TURNS[1], SYSTEM]},
            "turn 3: a system turn must be first",
        ),
        ({"messages": TURNS, "conversations": SHAREGPT}, "both 'messages' and 'conversations'"),
    ],
)
def test_bad_conversations_name_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_file(path)
    assert str(err.value).startswith("bad.jsonl line 1:")
    assert message in str(err.value)


def test_train_cli_on_chat_data_defaults_to_chat_template(tiny_llama_dir, tmp_path, capsys):
    import yaml

    from mola.cli import main

    long_user = {"role": "user", "content": "The cat sat on the mat. " * 30}
    rows = [{"messages": TURNS}, {"conversations": SHAREGPT}] * 2
    rows.append({"messages": [long_user, {"role": "assistant", "content": "yes"}]})
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--eval-data"]
    args += [str(data), "--max-steps", "1", "--save-steps", "0", "--output", str(out)]
    args += ["--experts", "2", "--r", "2", "--batch-size", "2", "--cutoff-len", "64"]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "cut 1 conversations; 1 of them kept no assistant token (left out)" in printed
    assert yaml.safe_load((out / "train_config.yaml").read_text())["template"] == "chat"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fine_tuned"]["n"] == 5 and metrics["fine_tuned"]["perplexity"] > 1
