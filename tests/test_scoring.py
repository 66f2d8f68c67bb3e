"""Tests for mola.scoring: log-likelihood scorer, metrics, answer parsing, generation."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from mola.data.datasets import DataError, Example
from mola.data.prompts import encode_choices
from mola.evaluation.scoring import (
    classification_metrics,
    evaluate_generation,
    evaluate_multiple_choice,
    parse_answer,
    score_choices,
)

EXAMPLES = [
    Example("What color is the sky on a clear day?", "", "blue", ["blue", "green", "red"]),
    Example("Is this news headline sarcastic?", "area man wins lottery", "yes", ["no", "yes"]),
    Example("Which is heavier?", "a feather or a brick", "the brick", ["the feather", "the brick"]),
    Example(
        "How would Alex feel afterwards?", "", "tired", ["happy", "excited and bored", "tired"]
    ),
    Example("Name a fruit.", "", "banana", ["apple", "banana", "cherry"]),
]


class ForwardOnly(torch.nn.Module):
    """A module exposing only ``forward(input_ids=, attention_mask=)`` -> ``.logits``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        return SimpleNamespace(logits=out.logits)


def reference_logprobs(model, tokenizer, example, template, cutoff_len):
    """Unbatched, unpadded summed log-probabilities of each choice."""
    prompt, choices = encode_choices(tokenizer, example, template, cutoff_len)
    sums = []
    with torch.no_grad():
        for choice in choices:
            full = torch.tensor([prompt + choice])
            logp = torch.log_softmax(model(input_ids=full).logits[0], dim=-1)
            sums.append(sum(logp[len(prompt) + i - 1, t].item() for i, t in enumerate(choice)))
    return sums, [len(c) for c in choices]


@pytest.mark.parametrize(("template", "batch_size"), [("alpaca", 3), ("qa", 1), ("chat", 16)])
def test_score_choices_matches_reference(tiny_llama, template, batch_size):
    model, tokenizer = tiny_llama
    results = score_choices(
        model, tokenizer, EXAMPLES, template, batch_size=batch_size, progress=False
    )
    assert len(results) == len(EXAMPLES)
    for example, result in zip(EXAMPLES, results, strict=True):
        sums, counts = reference_logprobs(model, tokenizer, example, template, 256)
        assert result["logprobs"] == pytest.approx(sums, abs=1e-4)
        assert result["num_tokens"] == counts
        assert result["pred"] == max(range(len(sums)), key=sums.__getitem__)
        norm = [s / n for s, n in zip(sums, counts, strict=True)]
        assert result["pred_norm"] == max(range(len(norm)), key=norm.__getitem__)
        assert result["label"] == example.label


def test_score_choices_truncates_and_accepts_forward_only_modules(tiny_llama):
    model, tokenizer = tiny_llama
    wrapped = ForwardOnly(model).train()
    results = score_choices(wrapped, tokenizer, EXAMPLES, cutoff_len=12, progress=False)
    assert wrapped.training and model.training  # training flag restored
    model.eval()
    for example, result in zip(EXAMPLES, results, strict=True):
        sums, _ = reference_logprobs(model, tokenizer, example, "alpaca", 12)
        assert result["logprobs"] == pytest.approx(sums, abs=1e-4)


def test_evaluate_multiple_choice(tiny_llama):
    model, tokenizer = tiny_llama
    metrics, records = evaluate_multiple_choice(
        model, tokenizer, EXAMPLES, "qa", batch_size=4, cutoff_len=64, progress=False
    )
    assert metrics["n"] == len(EXAMPLES)
    assert set(metrics) == {"accuracy", "accuracy_norm", "macro_f1", "n"}
    assert metrics["accuracy"] == sum(r["correct"] for r in records) / len(records)
    assert metrics["accuracy_norm"] == pytest.approx(
        sum(r["pred_norm"] == r["gold"] for r in records) / len(records)
    )
    assert [r["gold"] for r in records] == [ex.label for ex in EXAMPLES]
    assert records[0]["prompt"].startswith("Question: What color")
    assert records[0]["choices"] == EXAMPLES[0].choices
    json.dumps(records)  # JSONL-ready
    binary, _ = evaluate_multiple_choice(
        model, tokenizer, EXAMPLES[1:3], "qa", 4, 64, progress=False
    )
    assert {"f1", "mcc"} <= set(binary)


def test_evaluation_needs_choices(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(DataError, match="example 2 has no choices"):
        evaluate_multiple_choice(model, tokenizer, [EXAMPLES[0], Example("q", "", "a")])
    with pytest.raises(DataError, match="no examples"):
        score_choices(model, tokenizer, [], progress=False)
    bad = Example("q", "", "c", ["a", "b"])
    with pytest.raises(DataError, match="example 1: answer 'c' is not a choice"):
        evaluate_generation(model, tokenizer, [bad], progress=False)


def test_binary_metrics_known_answer():
    # Confusion matrix: TP 3, FP 1, FN 1, TN 3.
    preds = [1, 1, 0, 0, 1, 0, 1, 0]
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    metrics = classification_metrics(preds, labels, 2)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert metrics["mcc"] == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))
    # TP 2, FP 3, FN 1, TN 4: MCC = (2*4 - 3*1) / sqrt(5 * 3 * 7 * 5).
    preds = [1, 1, 0, 1, 1, 1, 0, 0, 0, 0]
    labels = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    mcc = classification_metrics(preds, labels, 2)["mcc"]
    assert mcc == pytest.approx((2 * 4 - 3 * 1) / math.sqrt(5 * 3 * 7 * 5))


def test_metrics_edge_cases():
    undefined = classification_metrics([1, 1, 1], [0, 1, 1], 2)
    assert undefined["mcc"] == 0.0 and undefined["f1"] == pytest.approx(0.8)
    assert classification_metrics([0, 0], [0, 0], 2) == {"accuracy": 1.0, "f1": 0.0, "mcc": 0.0}
    perfect = classification_metrics([0, 1, 1], [0, 1, 1], 2)
    assert perfect["mcc"] == pytest.approx(1.0) and perfect["f1"] == 1.0
    inverse = classification_metrics([1, 0], [0, 1], 2)
    assert inverse["mcc"] == pytest.approx(-1.0)
    unparsed = classification_metrics([None, 1], [0, 1], 2)
    assert unparsed["accuracy"] == 0.5 and unparsed["f1"] == 1.0
    with pytest.raises(ValueError):
        classification_metrics([0], [0, 1], 2)


def test_multiclass_metrics_known_answer():
    metrics = classification_metrics([0, 2, 2, 1], [0, 1, 2, 2], 3)
    # Per-class F1: class 0 = 1, class 1 = 0, class 2 = 2*1/(2+1+1) = 0.5.
    assert metrics == pytest.approx({"accuracy": 0.5, "macro_f1": 0.5})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is B", 1),
        ("the answer is (C).", 2),
        ("The answer is: A. blue", 0),
        ("I think the answer is green.", 1),
        ("Answer: Red", 2),
        ("The answer is the brick", None),  # not a choice of the default list below
        ("B", 1),
        ("(C)", 2),
        ("It must be green, not blue.", 1),
        ("A dog is not a colour; red is.", 2),
        ("Option B) green", 1),
        ("nothing useful", None),
        ("", None),
        ("The answer is D", None),
        ("bluegreen", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text, ["blue", "green", "red"]) == expected


def test_parse_answer_prefers_explicit_and_longest_choice():
    choices = ["no", "yes"]
    assert parse_answer("No. Wait, the answer is yes", choices) == 1
    assert parse_answer("yes, no doubt", choices) == 1
    assert parse_answer("the answer is the brick", ["the feather", "the brick"]) == 1
    assert parse_answer("go up high", ["go", "go up"]) == 1


def test_generation_hf_generate_and_forward_loop_agree(tiny_llama):
    model, tokenizer = tiny_llama
    kwargs = dict(template="qa", batch_size=3, max_new_tokens=5, progress=False)
    metrics, records = evaluate_generation(model, tokenizer, EXAMPLES, **kwargs)
    loop_metrics, loop_records = evaluate_generation(
        ForwardOnly(model), tokenizer, EXAMPLES, **kwargs
    )
    assert [r["generation"] for r in records] == [r["generation"] for r in loop_records]
    assert metrics == loop_metrics
    assert metrics["n"] == len(EXAMPLES)
    assert {"accuracy", "macro_f1", "unparsed"} <= set(metrics)
    for example, record in zip(EXAMPLES, records, strict=True):
        assert record["pred"] == parse_answer(record["generation"], example.choices)
        assert record["gold"] == example.label
    json.dumps(records)


def test_generation_stops_at_eos(tiny_llama):
    model, tokenizer = tiny_llama
    eos = tokenizer.eos_token_id

    class EosAfterOne(torch.nn.Module):
        """Predicts the token "B" once, then always EOS."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            vocab = len(tokenizer)
            logits = torch.zeros(*input_ids.shape, vocab)
            letter = tokenizer("B", add_special_tokens=False)["input_ids"][0]
            logits[:, :, letter] = 1.0
            seen = ((input_ids == letter) & (attention_mask == 1)).any(1)
            logits[seen, :, eos] = 2.0
            return SimpleNamespace(logits=logits)

    metrics, records = evaluate_generation(
        EosAfterOne(), tokenizer, EXAMPLES[:2], max_new_tokens=8, progress=False
    )
    assert [r["generation"] for r in records] == ["B", "B"]
    assert [r["pred"] for r in records] == [1, 1]
    assert metrics["accuracy"] == 0.5 and metrics["unparsed"] == 0


def test_single_token_choices_share_one_prompt_pass(tiny_llama):
    model, tokenizer = tiny_llama
    examples = [
        Example("Is this news headline sarcastic?", "area man wins lottery", "y", ["n", "y"]),
        Example("Pick a letter.", "", "b", ["a", "b", "c"]),
        Example("Pick another letter.", "", "a", ["a", "c"]),
    ]
    for example in examples:  # single characters are single byte-level tokens
        assert all(len(i) == 1 for i in encode_choices(tokenizer, example, "alpaca", 256)[1])
    rows = []

    class Counting(ForwardOnly):
        def forward(self, input_ids, attention_mask):
            rows.append(input_ids.shape[0])
            return super().forward(input_ids, attention_mask)

    results = score_choices(
        Counting(model), tokenizer, examples, "alpaca", batch_size=2, progress=False
    )
    assert sum(rows) == len(examples)  # one sequence per example, not one per choice
    for example, result in zip(examples, results, strict=True):
        sums, _ = reference_logprobs(model, tokenizer, example, "alpaca", 256)
        assert result["logprobs"] == pytest.approx(sums, abs=1e-4)


def test_scoring_progress_bar_counts_examples(tiny_llama, capsys):
    """The bar's total and unit are examples, not (example, choice) sequences."""
    model, tokenizer = tiny_llama
    score_choices(model, tokenizer, EXAMPLES, "alpaca", batch_size=2, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"{len(EXAMPLES)}/{len(EXAMPLES)}" in bar and "example" in bar, bar
