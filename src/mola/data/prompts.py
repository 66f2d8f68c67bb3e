"""Prompt templates, tokenisation for training/scoring, and the padding collator.

Tokenisation convention (shared by training and scoring): the prompt text and the response
text are tokenised *separately* with ``add_special_tokens=False`` and concatenated, so the
prompt/response boundary is exact and identical in training and evaluation. If the tokenizer
normally starts sequences with a BOS token, that BOS id is put in front of the prompt (unless
the rendered prompt already starts with it, as some chat templates do). Training responses end
with the tokenizer's EOS id; choices scored by log-likelihood do not.

Truncation to ``cutoff_len`` keeps the end of the response (its EOS) intact where possible: the
prompt is cut from the left (after the BOS, if any) to make room. The prompt is never cut below
``cutoff_len // 2`` tokens (or its full length, if shorter); when the response is too long for
that, the prompt keeps its last ``cutoff_len // 2`` tokens and the response is cut from the
right. Every response keeps at least one token.
"""

from __future__ import annotations

from typing import Any

import torch

from mola.data.conversations import encode_conversation, render_context
from mola.data.datasets import LETTERS, DataError, Example

TEMPLATES = ("alpaca", "qa", "chat")
"""Names of the prompt templates; ``alpaca`` is the default (``chat`` for chat data)."""

DEFAULT_TEMPLATE = "alpaca"
IGNORE_INDEX = -100

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_options(choices: list[str]) -> str:
    """Format choices as lettered lines: ``"Options:\\nA. x\\nB. y"``."""
    lines = [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices)]
    return "Options:\n" + "\n".join(lines)


def _options(example: Example, show_choices: bool) -> str:
    """The lettered options block, or "" when not shown."""
    return format_options(example.choices) if show_choices and example.choices else ""


def _join(*parts: str, sep: str) -> str:
    return sep.join(part for part in parts if part)


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise DataError(f"unknown template '{template}' (choose from {', '.join(TEMPLATES)})")


def default_template(examples: Any) -> str:
    """``chat`` when any example is a conversation, else :data:`DEFAULT_TEMPLATE`."""
    return "chat" if any(e.messages is not None for e in examples) else DEFAULT_TEMPLATE


def check_template_fits(examples: Any, template: str) -> None:
    """Chat data only with the ``chat`` template (checked before any work).

    Raises:
        DataError: a conversation and another template.
    """
    if any(e.messages is not None for e in examples):
        _check_chat(template)


def _check_chat(template: str) -> None:
    if template != "chat":
        raise DataError(
            f"--template {template}: chat data (messages/conversations) is rendered with the "
            "model's chat template; use --template chat (the default for such data)"
        )


def render_prompt(
    example: Example,
    template: str = DEFAULT_TEMPLATE,
    tokenizer: Any = None,
    *,
    show_choices: bool = False,
) -> str:
    """Render the prompt text of an example.

    Args:
        example: The example.
        template: One of :data:`TEMPLATES`.
        tokenizer: Needed for ``chat`` (its chat template is used).
        show_choices: Append the lettered choices ("Options: A. ... B. ...") to the input.

    Raises:
        DataError: Unknown template, or ``chat`` without a tokenizer chat template.
    """
    _check_template(template)
    if example.messages is not None:
        _check_chat(template)
        return render_context(tokenizer, example.messages)
    instruction = example.instruction.strip()
    context = example.input.strip()
    options = _options(example, show_choices)
    if template == "alpaca":
        context = _join(context, options, sep="\n\n")
        if context:
            return _ALPACA_WITH_INPUT.format(instruction=instruction, input=context)
        return _ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "qa":
        return _join(context, f"Question: {instruction}", options, "Answer:", sep="\n")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("template 'chat' needs a tokenizer with a chat template")
    content = _join(instruction, context, options, sep="\n\n")
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _response_text(text: str, template: str) -> str:
    return " " + text.strip() if template == "qa" else text.strip()


def render(
    example: Example,
    template: str = DEFAULT_TEMPLATE,
    tokenizer: Any = None,
    *,
    show_choices: bool = False,
) -> tuple[str, str]:
    """Render an example as (prompt text, response text).

    The response includes any separator the template puts before it (a leading space for
    ``qa``), so ``prompt + response`` is the full training text.
    """
    prompt = render_prompt(example, template, tokenizer, show_choices=show_choices)
    return prompt, _response_text(example.output, template)


def render_choices(example: Example, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The response text of every choice, formatted like :func:`render`'s response.

    Raises:
        DataError: The example has no choices.
    """
    if not example.choices:
        raise DataError(f"example has no choices: {example.instruction[:60]!r}")
    _check_template(template)
    return [_response_text(choice, template) for choice in example.choices]


# --------------------------------------------------------------------------- tokenisation


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_id]`` if the tokenizer adds a BOS token by default, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = list(tokenizer("a")["input_ids"])
    return [bos] if with_special[:1] == [bos] else []


def encode_prompt(
    tokenizer: Any,
    example: Example,
    template: str = DEFAULT_TEMPLATE,
    max_len: int | None = None,
    *,
    show_choices: bool = False,
) -> list[int]:
    """Token ids of the prompt (BOS-prefixed if the tokenizer uses one), left-truncated.

    Args:
        tokenizer: A Hugging Face tokenizer.
        example: The example.
        template: One of :data:`TEMPLATES`.
        max_len: Keep at most this many tokens (the BOS and the end of the prompt survive).
        show_choices: See :func:`render_prompt`.
    """
    prompt = render_prompt(example, template, tokenizer, show_choices=show_choices)
    ids = _ids(tokenizer, prompt)
    prefix = bos_prefix(tokenizer)
    if prefix and ids[:1] == prefix:
        ids = ids[1:]
    if max_len is not None:
        keep = max(max_len - len(prefix), 1)
        ids = ids[-keep:]
    return prefix + ids


def _check_cutoff(cutoff_len: int) -> None:
    if cutoff_len < 2:
        raise DataError(f"cutoff length must be at least 2, got {cutoff_len}")


def _fit(prompt: list[int], response_len: int, cutoff_len: int, prefix_len: int) -> tuple[int, int]:
    """Return (prompt tokens to keep, response tokens to keep) under ``cutoff_len``."""
    if len(prompt) + response_len <= cutoff_len:
        return len(prompt), response_len
    body = len(prompt) - prefix_len
    room = cutoff_len - prefix_len - response_len
    min_body = min(body, max(cutoff_len // 2 - prefix_len, 1))
    keep_body = max(0, min(max(room, min_body), cutoff_len - prefix_len - 1))
    return prefix_len + keep_body, cutoff_len - prefix_len - keep_body


def _cut_prompt(prompt: list[int], keep: int, prefix_len: int) -> list[int]:
    body = prompt[prefix_len:]
    return prompt[:prefix_len] + body[len(body) - (keep - prefix_len) :]


def encode_for_training(
    tokenizer: Any,
    example: Example,
    template: str = DEFAULT_TEMPLATE,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    *,
    show_choices: bool = False,
) -> dict[str, list[int]]:
    """Tokenise an example for causal-LM training.

    Args:
        tokenizer: A Hugging Face tokenizer with an EOS token.
        example: The example; its ``output`` is the target.
        template: One of :data:`TEMPLATES`.
        cutoff_len: Maximum sequence length (see the module docstring for truncation).
        train_on_inputs: Also compute the loss on prompt tokens.
        show_choices: See :func:`render_prompt`.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt tokens unless
        ``train_on_inputs``), all lists of int of equal length.
    """
    _check_cutoff(cutoff_len)
    if example.messages is not None:
        _check_chat(template)
        return encode_conversation(tokenizer, example, cutoff_len, train_on_inputs).row
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token")
    prompt_text, response_text = render(example, template, tokenizer, show_choices=show_choices)
    prompt = encode_prompt(tokenizer, example, template, show_choices=show_choices)
    response = _ids(tokenizer, response_text) + [tokenizer.eos_token_id]
    prefix_len = len(bos_prefix(tokenizer))
    keep_prompt, keep_response = _fit(prompt, len(response), cutoff_len, prefix_len)
    prompt = _cut_prompt(prompt, keep_prompt, prefix_len)
    response = response[:keep_response]
    input_ids = prompt + response
    prompt_labels = list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)
    encoded = {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": prompt_labels + response,
    }
    if example.group is not None:
        encoded["group"] = example.group
    return encoded


def encode_training_set(
    tokenizer: Any,
    examples: list[Example],
    template: str = DEFAULT_TEMPLATE,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    *,
    warn: Any = print,
) -> list[dict[str, list[int]]]:
    """:func:`encode_for_training` over a data set; conversations cut short are reported.

    A conversation that ``cutoff_len`` cuts before its first assistant token has nothing to
    learn: it is left out (kept with ``train_on_inputs``, which trains on its other tokens),
    and one line through ``warn`` says how many conversations were cut and how many of them
    lost every assistant token.

    Raises:
        DataError: every conversation lost its assistant tokens.
    """
    _check_cutoff(cutoff_len)
    rows, cut, emptied = [], 0, 0
    for example in examples:
        if example.messages is None:
            rows.append(
                encode_for_training(tokenizer, example, template, cutoff_len, train_on_inputs)
            )
            continue
        _check_chat(template)
        encoded = encode_conversation(tokenizer, example, cutoff_len, train_on_inputs)
        cut += encoded.truncated
        if encoded.assistant_tokens == 0:
            emptied += 1
            if not train_on_inputs:
                continue
        rows.append(encoded.row)
    if emptied:
        fate = "kept for their other tokens" if train_on_inputs else "left out"
        warn(
            f"mola: warning: --cutoff-len {cutoff_len} cut {cut} conversations; {emptied} of "
            f"them kept no assistant token ({fate}); raise --cutoff-len to train on them"
        )
    elif cut:
        warn(f"mola: note: --cutoff-len {cutoff_len} cut {cut} conversations short")
    if not rows:
        raise DataError(
            f"--cutoff-len {cutoff_len}: no conversation keeps an assistant token; raise it"
        )
    return rows


def encode_choices(
    tokenizer: Any,
    example: Example,
    template: str = DEFAULT_TEMPLATE,
    cutoff_len: int = 256,
    *,
    show_choices: bool = False,
) -> tuple[list[int], list[list[int]]]:
    """Tokenise a multiple-choice example for log-likelihood scoring.

    Every ``prompt + choice`` fits in ``cutoff_len``: the prompt is left-truncated to leave
    room for the longest choice; over-long choices are right-truncated (see module docstring).

    Returns:
        (prompt ids, list of each choice's ids); no EOS is appended to choices.
    """
    _check_cutoff(cutoff_len)
    prompt = encode_prompt(tokenizer, example, template, show_choices=show_choices)
    choices = [_ids(tokenizer, text) for text in render_choices(example, template)]
    prefix_len = len(bos_prefix(tokenizer))
    keep_prompt, keep_choice = _fit(prompt, max(map(len, choices)), cutoff_len, prefix_len)
    prompt = _cut_prompt(prompt, keep_prompt, prefix_len)
    return prompt, [choice[:keep_choice] for choice in choices]


# --------------------------------------------------------------------------- collator


class DataCollator:
    """Right-pad ``input_ids``/``attention_mask``/``labels`` features into tensors.

    Usable as ``data_collator`` of the Hugging Face ``Trainer``: pads to the longest sequence in
    the batch with ``pad_token_id``, ``0`` and ``-100`` respectively; examples' ``group`` (when
    any has one) becomes a ``(B,)`` tensor, ``-1`` where missing. Other keys are ignored.

    Args:
        pad_token_id: Id used to pad ``input_ids``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate a list of encoded examples into a padded batch."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch: dict[str, torch.Tensor] = {}
        for key, pad in pads.items():
            if key == "labels" and "labels" not in features[0]:
                continue
            rows = []
            for feature in features:
                values = list(feature.get(key, [1] * len(feature["input_ids"])))
                rows.append(values + [pad] * (width - len(values)))
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if any("group" in f for f in features):  # example types (LoRAMoE); -1 = none
            batch["group"] = torch.tensor([f.get("group", -1) for f in features])
        return batch
