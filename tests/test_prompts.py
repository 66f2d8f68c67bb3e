"""Tests for mola.prompts: templates, training encoding, truncation, choices, collator."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_tokenizer

from mola.data.datasets import DataError, Example
from mola.data.prompts import (
    IGNORE_INDEX,
    TEMPLATES,
    DataCollator,
    bos_prefix,
    encode_choices,
    encode_for_training,
    encode_prompt,
    render,
    render_choices,
    render_prompt,
)

WITH_INPUT = Example("Translate to French.", "hello world", "bonjour le monde")
NO_INPUT = Example("Name a fruit.", "", "apple")
CHOICE = Example("What color is the sky?", "On a clear day.", "blue", ["blue", "green"])
PREAMBLE = "Below is an instruction that describes a task"


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The tiny tokenizer, but adding a BOS token by default (like Llama/Gemma tokenizers)."""
    from tokenizers import processors

    tokenizer = build_tiny_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    assert tokenizer("a")["input_ids"][0] == bos
    return tokenizer


def test_alpaca_with_and_without_input():
    prompt, response = render(WITH_INPUT, "alpaca")
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to French.\n\n### Input:\nhello world\n\n### Response:\n"
    )
    assert response == "bonjour le monde"
    prompt, response = render(NO_INPUT)
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a fruit.\n\n### Response:\n"
    )
    assert "### Input" not in prompt and response == "apple"


def test_qa_template():
    assert render(NO_INPUT, "qa") == ("Question: Name a fruit.\nAnswer:", " apple")
    prompt, _ = render(CHOICE, "qa")
    assert prompt == "On a clear day.\nQuestion: What color is the sky?\nAnswer:"
    assert render_choices(CHOICE, "qa") == [" blue", " green"]
    assert render_choices(CHOICE, "alpaca") == ["blue", "green"]


def test_chat_template(tiny_tokenizer):
    prompt, response = render(WITH_INPUT, "chat", tiny_tokenizer)
    assert prompt == (
        "<|im_start|>user\nTranslate to French.\n\nhello world<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response == "bonjour le monde"


def test_chat_template_missing(tiny_tokenizer):
    with pytest.raises(DataError, match="chat template"):
        render(NO_INPUT, "chat")
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        render(NO_INPUT, "chat", plain)


def test_unknown_template_and_missing_choices():
    with pytest.raises(DataError, match="unknown template 'x' \\(choose from alpaca, qa, chat\\)"):
        render(NO_INPUT, "x")
    with pytest.raises(DataError, match="no choices"):
        render_choices(NO_INPUT, "qa")


@pytest.mark.parametrize("template", TEMPLATES)
def test_show_choices(tiny_tokenizer, template):
    prompt = render_prompt(CHOICE, template, tiny_tokenizer, show_choices=True)
    assert "Options:\nA. blue\nB. green" in prompt
    assert "On a clear day." in prompt and "What color is the sky?" in prompt
    assert "Options" not in render_prompt(CHOICE, template, tiny_tokenizer)
    assert "Options" not in render_prompt(NO_INPUT, template, tiny_tokenizer, show_choices=True)


@pytest.mark.parametrize("template", TEMPLATES)
def test_encode_for_training_masks_prompt(tiny_tokenizer, template):
    prompt, response = render(WITH_INPUT, template, tiny_tokenizer)
    prompt_ids = ids(tiny_tokenizer, prompt)
    response_ids = ids(tiny_tokenizer, response) + [tiny_tokenizer.eos_token_id]
    enc = encode_for_training(tiny_tokenizer, WITH_INPUT, template, cutoff_len=512)
    assert enc["input_ids"] == prompt_ids + response_ids
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    enc = encode_for_training(tiny_tokenizer, WITH_INPUT, template, 512, train_on_inputs=True)
    assert enc["labels"] == enc["input_ids"]


def test_truncation_keeps_response_end(tiny_tokenizer):
    full = encode_for_training(tiny_tokenizer, WITH_INPUT, "alpaca", cutoff_len=512)
    n_response = sum(label != IGNORE_INDEX for label in full["labels"])
    cutoff = n_response + 5
    enc = encode_for_training(tiny_tokenizer, WITH_INPUT, "alpaca", cutoff_len=cutoff)
    assert len(enc["input_ids"]) == cutoff
    assert enc["input_ids"] == full["input_ids"][-cutoff:]  # prompt cut from the left
    assert enc["labels"][-n_response:] == full["labels"][-n_response:]
    assert enc["labels"][:5] == [IGNORE_INDEX] * 5


def test_truncation_of_a_long_response(tiny_tokenizer):
    long = Example("Name a fruit.", "", " ".join(["apple banana cherry"] * 20))
    full = encode_for_training(tiny_tokenizer, long, "qa", cutoff_len=1024)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    enc = encode_for_training(tiny_tokenizer, long, "qa", cutoff_len=16)
    assert len(enc["input_ids"]) == 16
    assert enc["labels"].count(IGNORE_INDEX) == 8  # half the window keeps the prompt's end
    assert enc["input_ids"][:8] == full["input_ids"][n_prompt - 8 : n_prompt]
    assert enc["input_ids"][8:] == full["input_ids"][n_prompt : n_prompt + 8]
    with pytest.raises(DataError, match="at least 2"):
        encode_for_training(tiny_tokenizer, long, "qa", cutoff_len=1)


def test_bos_prefix_is_kept(tiny_tokenizer, bos_tokenizer):
    assert bos_prefix(tiny_tokenizer) == []
    bos = bos_tokenizer.bos_token_id
    assert bos_prefix(bos_tokenizer) == [bos]
    enc = encode_for_training(bos_tokenizer, WITH_INPUT, "qa", cutoff_len=512)
    assert enc["input_ids"][0] == bos and enc["input_ids"].count(bos) == 1
    short = encode_for_training(bos_tokenizer, WITH_INPUT, "qa", cutoff_len=12)
    assert short["input_ids"][0] == bos and len(short["input_ids"]) == 12
    assert short["input_ids"][-3:] == enc["input_ids"][-3:]
    # A chat template that already starts with the BOS text does not get a second one.
    chat = encode_prompt(bos_tokenizer, WITH_INPUT, "chat")
    assert chat[0] == bos and chat.count(bos) == 2  # <|im_start|> opens both turns
    assert encode_prompt(bos_tokenizer, WITH_INPUT, "chat", max_len=4)[0] == bos


@pytest.mark.parametrize("template", TEMPLATES)
def test_encode_choices(tiny_tokenizer, template):
    prompt, choices = encode_choices(tiny_tokenizer, CHOICE, template, cutoff_len=512)
    assert prompt == ids(tiny_tokenizer, render_prompt(CHOICE, template, tiny_tokenizer))
    assert choices == [ids(tiny_tokenizer, t) for t in render_choices(CHOICE, template)]
    assert tiny_tokenizer.eos_token_id not in choices[0]
    prompt, choices = encode_choices(tiny_tokenizer, CHOICE, template, cutoff_len=6)
    assert all(len(prompt) + len(c) <= 6 for c in choices) and prompt


def test_collator_pads_right():
    collate = DataCollator(pad_token_id=7)
    batch = collate(
        [
            {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
            {"input_ids": [4], "attention_mask": [1], "labels": [4], "extra": "ignored"},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    no_labels = collate([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert set(no_labels) == {"input_ids", "attention_mask"}
    assert no_labels["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="empty"):
        collate([])
