"""Evaluate a model on examples: multiple choice by log-likelihood or generation, or response
loss (perplexity) for instruction data without choices."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from mola.data.datasets import DataError, Example
from mola.data.prompts import DataCollator, encode_for_training, render_prompt
from mola.evaluation.scoring import EvalMode, evaluate_generation, evaluate_multiple_choice

SCORINGS = ("loglik", "generate")


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    template: str = "alpaca",
    scoring: str = "loglik",
    batch_size: int = 16,
    cutoff_len: int = 256,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``(metrics, per-example records)`` for ``examples``.

    Multiple-choice examples are scored by the summed log-probability of each choice's text
    (``scoring="loglik"``, also reporting the length-normalised variant) or by greedy generation
    parsed for "The answer is X" (``scoring="generate"``, choices listed in the prompt).
    Instruction examples (no choices) report the mean per-token loss of the response and its
    perplexity.

    Raises:
        DataError: a mix of multiple-choice and instruction examples, or an unknown scoring.
    """
    if scoring not in SCORINGS:
        raise DataError(f"unknown scoring {scoring!r} (choose from {', '.join(SCORINGS)})")
    with_choices = sum(1 for e in examples if e.choices)
    if with_choices and with_choices != len(examples):
        raise DataError("evaluation data mixes multiple-choice and instruction rows; split them")
    if with_choices and scoring == "generate":
        return evaluate_generation(
            model,
            tokenizer,
            examples,
            template,
            batch_size,
            progress=progress,
            cutoff_len=cutoff_len,
            show_choices=True,
        )
    if with_choices:
        return evaluate_multiple_choice(
            model, tokenizer, examples, template, batch_size, cutoff_len, progress
        )
    return response_loss(model, tokenizer, examples, template, batch_size, cutoff_len, progress)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    sets: dict[str, Sequence[Example]],
    **kwargs: Any,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """:func:`evaluate` on each named set, e.g. each task of a mixture on its own test split.

    Args:
        sets: Examples by task name; a single key ``""`` is one plain set (a single task or an
            evaluation file), scored and reported as :func:`evaluate` does.
        **kwargs: :func:`evaluate`'s keyword arguments.

    Returns:
        ``(metrics, records)``: for several tasks, :func:`mixture_metrics` of the per-task
        metrics, and every record with its ``task``; for ``{"": examples}``, :func:`evaluate`'s.
    """
    if not sets:
        raise DataError("nothing to evaluate: no task or evaluation set given")
    per_task: dict[str, dict[str, float]] = {}
    records: list[dict[str, Any]] = []
    for task, examples in sets.items():
        metrics, task_records = evaluate(model, tokenizer, examples, **kwargs)
        per_task[task] = metrics
        records += [{"task": task, **r} if task else r for r in task_records]
    if "" in per_task:
        if len(per_task) > 1:
            raise DataError("a plain evaluation set ('') cannot be mixed with named tasks")
        return per_task[""], records
    return mixture_metrics(per_task), records


def mixture_metrics(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """A mixture's metrics: each task's as ``<task>_<metric>``, and the metrics every task has
    averaged over the tasks (each task weighs the same); ``n`` is the items scored in all."""
    out: dict[str, float] = {}
    shared = [m for m in next(iter(per_task.values())) if all(m in t for t in per_task.values())]
    for metric in shared:
        if metric != "n":
            out[metric] = sum(t[metric] for t in per_task.values()) / len(per_task)
    out["n"] = sum(int(t.get("n", 0)) for t in per_task.values())
    for task, metrics in per_task.items():
        out.update({f"{task}_{k}": v for k, v in metrics.items()})
    return out


def response_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    template: str = "alpaca",
    batch_size: int = 16,
    cutoff_len: int = 256,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean negative log-likelihood per response token, and perplexity."""
    collate = DataCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    records: list[dict[str, Any]] = []
    total_nll, total_tokens = 0.0, 0
    with EvalMode(model):
        starts = range(0, len(examples), batch_size)
        for start in tqdm(starts, desc="eval", disable=not progress, unit="batch"):
            chunk = examples[start : start + batch_size]
            batch = collate(
                [encode_for_training(tokenizer, e, template, cutoff_len) for e in chunk]
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
            targets = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            mask = targets != -100
            picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            nll = -(picked * mask).sum(dim=1)
            counts = mask.sum(dim=1)
            for e, n, c in zip(chunk, nll.tolist(), counts.tolist(), strict=True):
                records.append(
                    {
                        "prompt": render_prompt(e, template, tokenizer),
                        "output": e.output,
                        "nll": n,
                        "tokens": c,
                    }
                )
                total_nll += n
                total_tokens += c
    mean = total_nll / max(total_tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "n": len(examples)}, records
