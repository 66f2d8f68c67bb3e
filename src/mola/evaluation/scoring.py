"""Multiple-choice evaluation: log-likelihood scoring, generation + parsing, and metrics.

Log-likelihood scoring (:func:`score_choices`) sums the log-probabilities of each choice's
tokens given the prompt (tokenised as in :mod:`mola.prompts`). It needs only a model whose
``forward(input_ids=..., attention_mask=...)`` returns an object with ``.logits``, so it works
for Hugging Face causal LMs and wrappers such as MolaModel alike.

Generation scoring (:func:`evaluate_generation`, as in the MoLA paper) decodes greedily and
parses the answer with :func:`parse_answer`. Models with a ``generate`` method are run with
left padding through it; other modules use a simple cache-free greedy loop.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from mola.data.datasets import LETTERS, DataError, Example
from mola.data.prompts import DEFAULT_TEMPLATE, encode_choices, encode_prompt, render_prompt

# --------------------------------------------------------------------------- metrics


def _f1(preds: Sequence[int | None], labels: Sequence[int], cls: int) -> float:
    tp = sum(p == cls and y == cls for p, y in zip(preds, labels, strict=True))
    fp = sum(p == cls and y != cls for p, y in zip(preds, labels, strict=True))
    fn = sum(p != cls and y == cls for p, y in zip(preds, labels, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _mcc(preds: Sequence[int | None], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class form; a ``None`` prediction is its own class)."""
    n = len(labels)
    correct = sum(p == y for p, y in zip(preds, labels, strict=True))
    classes = set(labels) | set(preds)
    pred_counts = {c: sum(p == c for p in preds) for c in classes}
    true_counts = {c: sum(y == c for y in labels) for c in classes}
    cov_xy = correct * n - sum(pred_counts[c] * true_counts[c] for c in classes)
    cov_xx = n * n - sum(v * v for v in pred_counts.values())
    cov_yy = n * n - sum(v * v for v in true_counts.values())
    if cov_xx == 0 or cov_yy == 0:
        return 0.0
    return cov_xy / math.sqrt(cov_xx * cov_yy)


def classification_metrics(
    preds: Sequence[int | None], labels: Sequence[int], num_classes: int
) -> dict[str, float]:
    """Accuracy plus F1/MCC (binary) or macro-F1 (multi-class).

    Args:
        preds: Predicted class indices; ``None`` (unparsable answer) counts as wrong.
        labels: Gold class indices.
        num_classes: Number of classes; 2 selects the binary metrics.

    Returns:
        ``accuracy``; for binary tasks ``f1`` (positive class = index 1) and ``mcc`` (0.0 when
        undefined); otherwise ``macro_f1`` (mean F1 over the ``num_classes`` classes).
    """
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no predictions to score")
    metrics = {"accuracy": sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)}
    if num_classes == 2:
        metrics["f1"] = _f1(preds, labels, 1)
        metrics["mcc"] = _mcc(preds, labels)
    else:
        metrics["macro_f1"] = sum(_f1(preds, labels, c) for c in range(num_classes)) / num_classes
    return metrics


# --------------------------------------------------------------------------- log-likelihood


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _check_choices(examples: Sequence[Example]) -> None:
    if not examples:
        raise DataError("no examples to evaluate")
    for number, example in enumerate(examples, start=1):
        if not example.choices:
            raise DataError(
                f"example {number} has no choices: multiple-choice evaluation needs 'choices'"
            )


class EvalMode:
    """Context manager: eval mode + inference mode, restoring the training flag."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.was_training = model.training
        self.inference = torch.inference_mode()

    def __enter__(self) -> None:
        self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (base) model can apply its output head to selected positions only."""
    target = getattr(model, "base_model", model)
    try:
        return "logits_to_keep" in inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return False


def score_choices(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 8,
    cutoff_len: int = 256,
    progress: bool = True,
    *,
    show_choices: bool = False,
) -> list[dict[str, Any]]:
    """Score each choice of each example by its summed log-likelihood given the prompt.

    All (example, choice) sequences are batched together (longest first, right padding with an
    attention mask). When all of an example's choices are single tokens, its prompt is run once
    and every choice read from the same next-token distribution.

    Args:
        model: Causal LM; ``model(input_ids=, attention_mask=).logits`` is used.
        tokenizer: Its tokenizer.
        examples: Multiple-choice examples.
        template: Prompt template name.
        batch_size: Sequences per forward pass.
        cutoff_len: Maximum tokens of ``prompt + choice``.
        progress: Show a tqdm progress bar.
        show_choices: List the lettered choices in the prompt.

    Returns:
        Per example: ``logprobs`` (per choice), ``num_tokens`` (per choice), ``pred`` (argmax
        of the sum), ``pred_norm`` (argmax of the per-token mean) and ``label``.
    """
    _check_choices(examples)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    # A job is one sequence to run: (example index, token ids, [(choice, first position, ids)]).
    # When every choice is a single token, one prompt-only sequence scores them all.
    jobs: list[tuple[int, list[int], list[tuple[int, int, list[int]]]]] = []
    counts = []
    for ex_idx, example in enumerate(examples):
        prompt, choices = encode_choices(
            tokenizer, example, template, cutoff_len, show_choices=show_choices
        )
        counts.append([len(ids) for ids in choices])
        start = len(prompt) - 1
        if all(len(ids) == 1 for ids in choices):
            jobs.append((ex_idx, prompt, [(c, start, ids) for c, ids in enumerate(choices)]))
        else:
            jobs.extend((ex_idx, prompt + ids, [(c, start, ids)]) for c, ids in enumerate(choices))
    jobs.sort(key=lambda job: -len(job[1]))
    logprobs = [[0.0] * len(ex.choices or []) for ex in examples]
    device, pad_id = _device(model), _pad_id(tokenizer)
    head_positions = accepts_logits_to_keep(model)
    pending = [0] * len(examples)  # jobs left per example: the bar counts whole examples
    for job in jobs:
        pending[job[0]] += 1
    bar_args = {"total": len(examples), "desc": "scoring", "unit": "example"}
    with EvalMode(model), tqdm(**bar_args, disable=not progress) as bar:
        for first in range(0, len(jobs), batch_size):
            batch = jobs[first : first + batch_size]
            ids, mask = _right_padded([seq for _, seq, _ in batch], pad_id)
            column = torch.arange(ids.shape[1])  # position -> column of the returned logits
            kwargs = {}
            if head_positions:  # the vocabulary head only where a choice token is predicted
                keep = sorted(
                    {
                        pos
                        for _, _, scored in batch
                        for _, at, c in scored
                        for pos in range(at, at + len(c))
                    }
                )
                column[keep] = torch.arange(len(keep))
                kwargs["logits_to_keep"] = torch.tensor(keep, device=device)
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
            ).logits
            for row, (ex_idx, _, scored) in enumerate(batch):
                for c_idx, at, choice in scored:
                    cols = column[at : at + len(choice)].to(logits.device)
                    logp = torch.log_softmax(logits[row, cols].float(), dim=-1)
                    targets = torch.tensor(choice, dtype=torch.long, device=logp.device)
                    logprobs[ex_idx][c_idx] = float(logp.gather(1, targets[:, None]).sum())
            finished = 0
            for ex_idx, _, _ in batch:
                pending[ex_idx] -= 1
                finished += pending[ex_idx] == 0
            bar.update(finished)
    results = []
    for example, sums, num_tokens in zip(examples, logprobs, counts, strict=True):
        norm = [s / max(n, 1) for s, n in zip(sums, num_tokens, strict=True)]
        results.append(
            {
                "logprobs": sums,
                "num_tokens": num_tokens,
                "pred": max(range(len(sums)), key=sums.__getitem__),
                "pred_norm": max(range(len(norm)), key=norm.__getitem__),
                "label": example.label,
            }
        )
    return results


def _num_classes(examples: Sequence[Example]) -> int:
    return max(len(ex.choices or []) for ex in examples)


def _labels(examples: Sequence[Example]) -> list[int]:
    labels = []
    for number, example in enumerate(examples, start=1):
        if example.label is None:
            raise DataError(f"example {number}: answer {example.output!r} is not a choice")
        labels.append(example.label)
    return labels


def evaluate_multiple_choice(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], *args: Any, **kwargs: Any
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Evaluate multiple-choice examples by log-likelihood.

    Takes the arguments of :func:`score_choices` (``template``, ``batch_size``, ``cutoff_len``,
    ``progress``, ``show_choices``), positional or by name, with its defaults.

    Returns:
        (metrics, records). Metrics: ``accuracy``, ``accuracy_norm``, ``f1``+``mcc`` (binary)
        or ``macro_f1``, and ``n``. One JSON-serialisable record per example with ``prompt``,
        ``choices``, ``gold``, ``pred``, ``pred_norm`` (indices), ``correct`` and ``logprobs``.
    """
    options = inspect.signature(score_choices).bind(model, tokenizer, examples, *args, **kwargs)
    options.apply_defaults()
    template, show_choices = options.arguments["template"], options.arguments["show_choices"]
    _check_choices(examples)
    labels = _labels(examples)
    scores = score_choices(*options.args, **options.kwargs)
    preds = [s["pred"] for s in scores]
    metrics = classification_metrics(preds, labels, _num_classes(examples))
    norm_preds = [s["pred_norm"] for s in scores]
    metrics["accuracy_norm"] = sum(p == y for p, y in zip(norm_preds, labels, strict=True)) / len(
        labels
    )
    metrics["n"] = len(labels)
    records = [
        {
            "prompt": render_prompt(ex, template, tokenizer, show_choices=show_choices),
            "choices": list(ex.choices or []),
            "gold": label,
            "pred": score["pred"],
            "pred_norm": score["pred_norm"],
            "correct": score["pred"] == label,
            "logprobs": score["logprobs"],
            "num_tokens": score["num_tokens"],
        }
        for ex, label, score in zip(examples, labels, scores, strict=True)
    ]
    return metrics, records


# --------------------------------------------------------------------------- generation

_ANSWER_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)


def _letter_at(text: str, pos: int, choices: Sequence[str], *, bare: bool) -> int | None:
    """Choice index if ``text[pos:]`` starts with a letter like ``(B)``, ``B)``, ``B.``, ``B``.

    With ``bare=False`` a plain letter must be followed by ``)``, ``.`` or ``:`` (or end the
    text), so the article "A" in running text is not taken for an answer.
    """
    pattern = r"\(([A-Z])\)|([A-Z])(?:[.):]|$)" + (r"|([A-Z])(?![\w'])" if bare else "")
    match = re.compile(pattern).match(text, pos)
    if match is None:
        return None
    letter = next(g for g in match.groups() if g)
    index = LETTERS.index(letter)
    return index if index < len(choices) else None


def _text_at(text: str, pos: int, choices: Sequence[str]) -> int | None:
    """Index of the longest choice text that ``text[pos:]`` starts with (case-insensitive)."""
    best = None
    for index, choice in enumerate(choices):
        pattern = re.compile(re.escape(choice.strip()) + r"(?!\w)", re.IGNORECASE)
        if pattern.match(text, pos) and (best is None or len(choice) > len(choices[best])):
            best = index
    return best


def parse_answer(text: str, choices: Sequence[str]) -> int | None:
    """Find the chosen answer in generated text.

    First looks for "The answer is X" (or "Answer: X"), where X is a letter (``B``, ``(B)``,
    ``B.``) or a choice text (case-insensitive). Otherwise takes the earliest mention of a
    choice text (as a whole word) or of a marked letter (``(B)``, ``B)``, ``B.``, or the whole
    reply being a letter).

    Args:
        text: The generated reply.
        choices: The candidate answers.

    Returns:
        The choice index, or ``None`` when nothing matches.
    """
    for match in _ANSWER_RE.finditer(text):
        pos = match.end()
        found = _text_at(text, pos, choices)
        if found is None:
            found = _letter_at(text, pos, choices, bare=True)
        if found is not None:
            return found
    stripped = text.strip()
    if len(stripped) == 1:
        return _letter_at(stripped, 0, choices, bare=True)
    for pos in range(len(text)):
        if pos and (text[pos - 1].isalnum() or text[pos - 1] == "_"):
            continue
        found = _text_at(text, pos, choices)
        if found is None:
            found = _letter_at(text, pos, choices, bare=False)
        if found is not None:
            return found
    return None


def _until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Cut a generated sequence at (and excluding) the first EOS."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def _generate_hf(
    model: Any, seqs: list[list[int]], tokenizer: Any, max_new: int
) -> list[list[int]]:
    from transformers import GenerationConfig

    pad_id = _pad_id(tokenizer)
    ids, mask = _left_padded(seqs, pad_id)
    device = _device(model)
    config = GenerationConfig(
        max_new_tokens=max_new,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
    )
    return [_until_eos(row.tolist(), tokenizer.eos_token_id) for row in out[:, ids.shape[1] :]]


def _generate_loop(
    model: Any, seqs: list[list[int]], tokenizer: Any, max_new: int
) -> list[list[int]]:
    """Greedy decoding without a KV cache for modules that only implement ``forward``."""
    eos, pad_id, device = tokenizer.eos_token_id, _pad_id(tokenizer), _device(model)
    outputs: list[list[int]] = [[] for _ in seqs]
    active = list(range(len(seqs)))
    for _ in range(max_new):
        if not active:
            break
        ids, mask = _right_padded([seqs[i] + outputs[i] for i in active], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        lengths = mask.sum(dim=1) - 1
        next_ids = logits[torch.arange(len(active)), lengths.to(logits.device)].argmax(-1)
        still = []
        for i, token in zip(active, next_ids.tolist(), strict=True):
            if token == eos:
                continue
            outputs[i].append(token)
            still.append(i)
        active = still
    return outputs


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
    *,
    cutoff_len: int = 256,
    show_choices: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Evaluate multiple-choice examples by greedy generation and :func:`parse_answer`.

    Args:
        model: Causal LM (``generate`` is used when present) or a forward-only module.
        tokenizer: Its tokenizer.
        examples: Multiple-choice examples.
        template: Prompt template name.
        batch_size: Prompts per generation batch.
        max_new_tokens: Maximum generated tokens per prompt.
        progress: Show a tqdm progress bar.
        cutoff_len: Prompts are left-truncated to this many tokens.
        show_choices: List the lettered choices in the prompt.

    Returns:
        (metrics, records) like :func:`evaluate_multiple_choice`; metrics have ``accuracy``,
        ``f1``+``mcc`` or ``macro_f1``, ``unparsed`` (replies with no recognisable answer) and
        ``n``; records have ``prompt``, ``choices``, ``gold``, ``pred`` (``None`` if
        unparsed), ``correct`` and ``generation``.
    """
    _check_choices(examples)
    labels = _labels(examples)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch size and max_new_tokens must be at least 1")
    prompts = [
        encode_prompt(tokenizer, ex, template, cutoff_len, show_choices=show_choices)
        for ex in examples
    ]
    generate = _generate_hf if callable(getattr(model, "generate", None)) else _generate_loop
    texts: list[str] = []
    with EvalMode(model), tqdm(total=len(prompts), desc="generating", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            for new_ids in generate(model, batch, tokenizer, max_new_tokens):
                texts.append(tokenizer.decode(new_ids, skip_special_tokens=True).strip())
            bar.update(len(batch))
    preds = [parse_answer(text, ex.choices or []) for text, ex in zip(texts, examples, strict=True)]
    metrics = classification_metrics(preds, labels, _num_classes(examples))
    metrics["unparsed"] = sum(p is None for p in preds)
    metrics["n"] = len(labels)
    records = [
        {
            "prompt": render_prompt(ex, template, tokenizer, show_choices=show_choices),
            "choices": list(ex.choices or []),
            "gold": label,
            "pred": pred,
            "correct": pred == label,
            "generation": text,
        }
        for ex, label, pred, text in zip(examples, labels, preds, texts, strict=True)
    ]
    return metrics, records
