"""Chat data: multi-turn conversations, rendered with the model's chat template.

Two row forms are read, the OpenAI / TRL one and ShareGPT's::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}

Training targets are the assistant turns, every one of them (not only the last): the tokens a
turn adds to the rendered text, up to and including the EOS token that the template closes it
with (what follows that EOS, such as a newline, is not a target). They are found by rendering
the conversation incrementally with the tokenizer's chat template: turn ``i``'s text is what
``messages[: i + 1]`` renders beyond ``messages[:i]`` with the generation prompt. The pieces
are tokenised separately (``add_special_tokens=False``) and concatenated, the convention of
:mod:`mola.data.prompts`; a template that rewrites earlier turns when later ones are added
(some strip past reasoning) cannot be split so and is refused with a one-line error.

Conversations longer than ``cutoff_len`` are cut from the right (the first turns are kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mola.data.example import DataError, Example

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
"""ShareGPT ``from`` values -> roles."""

CHAT_FIELDS = ("messages", "conversations")
"""Row fields that hold a conversation."""


def is_chat_row(row: dict[str, Any]) -> bool:
    """Whether a data row is a conversation (has ``messages`` or ``conversations``)."""
    return any(name in row for name in CHAT_FIELDS)


def _turn(item: Any, field: str, number: int, where: str) -> dict[str, str]:
    here = f"{where}: field '{field}' turn {number}"
    if not isinstance(item, dict):
        raise DataError(f"{here}: expected an object, got {type(item).__name__}")
    if field == "messages":
        role_key, text_key, names = "role", "content", {r: r for r in ROLES}
    else:
        role_key, text_key, names = "from", "value", SHAREGPT_ROLES
    for key in (role_key, text_key):
        if key not in item:
            raise DataError(f"{here}: missing '{key}'")
    role = item[role_key]
    if role not in names:
        raise DataError(
            f"{here}: unknown {role_key} {role!r} (expected {', '.join(sorted(set(names)))})"
        )
    content = item[text_key]
    if not isinstance(content, str):
        raise DataError(f"{here}: '{text_key}' must be a string, got {type(content).__name__}")
    return {"role": names[role], "content": content}


def parse_conversation(row: dict[str, Any], where: str) -> Example:
    """A chat row as an :class:`Example` with ``messages``; errors name the row and turn.

    Raises:
        DataError: both fields, not a list, an unknown role, a non-string text, a system turn
            that is not first, or no assistant turn with text.
    """
    present = [name for name in CHAT_FIELDS if name in row]
    if len(present) > 1:
        raise DataError(f"{where}: both 'messages' and 'conversations'; keep one")
    field = present[0]
    turns = row[field]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field '{field}' must be a list, got {type(turns).__name__}")
    messages = [_turn(item, field, n, where) for n, item in enumerate(turns, start=1)]
    for number, message in enumerate(messages, start=1):
        if message["role"] == "system" and number != 1:
            raise DataError(f"{where}: field '{field}' turn {number}: a system turn must be first")
    replies = [m["content"] for m in messages if m["role"] == "assistant" and m["content"].strip()]
    if not replies:
        raise DataError(f"{where}: field '{field}' has no assistant turn with text")
    users = [m["content"] for m in messages if m["role"] == "user"]
    return Example(instruction=users[0] if users else "", output=replies[-1], messages=messages)


# --------------------------------------------------------------------------- rendering


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def check_chat_template(tokenizer: Any) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat data needs a tokenizer with a chat template (this model's has none); "
            "give instruction/output rows instead"
        )


def render_context(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation up to its last assistant turn, ending in the generation prompt."""
    check_chat_template(tokenizer)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _render(tokenizer, messages[:last], True)


def segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_assistant_target)`` pieces, in order.

    Raises:
        DataError: no chat template, or one that does not render the turns incrementally.
    """
    check_chat_template(tokenizer)
    eos = getattr(tokenizer, "eos_token", None)
    pieces: list[tuple[str, bool]] = []
    done = ""  # the text already split into pieces
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True)
        after = _render(tokenizer, messages[: index + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise DataError(
                "the tokenizer's chat template changes earlier turns when a turn is added; "
                "mola cannot find the assistant tokens (use instruction/output rows)"
            )
        reply = after[len(before) :]
        cut = reply.rfind(eos) + len(eos) if eos and eos in reply else len(reply.rstrip())
        pieces += [(before[len(done) :], False), (reply[:cut], True)]
        done = before + reply[:cut]
    full = _render(tokenizer, messages, False)
    if not full.startswith(done):
        raise DataError(
            "the tokenizer's chat template changes earlier turns when a turn is added; "
            "mola cannot find the assistant tokens (use instruction/output rows)"
        )
    pieces.append((full[len(done) :], False))
    return [(text, target) for text, target in pieces if text]


@dataclass
class ChatEncoding:
    """A tokenised conversation and what truncation did to it."""

    row: dict[str, Any]
    assistant_tokens: int
    """Assistant target tokens left after truncation (0: the cut removed every one)."""
    truncated: bool


def encode_conversation(
    tokenizer: Any,
    example: Example,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
) -> ChatEncoding:
    """``input_ids``/``attention_mask``/``labels`` of a conversation, cut at ``cutoff_len``.

    Labels are the token ids on every assistant turn and ``-100`` elsewhere, or the ids
    everywhere with ``train_on_inputs``.
    """
    if not example.messages:
        raise DataError("not a conversation: the example has no messages")
    ids: list[int] = []
    targets: list[bool] = []
    for text, target in segments(tokenizer, example.messages):
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += piece
        targets += [target] * len(piece)
    truncated = len(ids) > cutoff_len
    ids, targets = ids[:cutoff_len], targets[:cutoff_len]
    labels = [
        t if (train_on_inputs or keep) else IGNORE_INDEX
        for t, keep in zip(ids, targets, strict=True)
    ]
    row: dict[str, Any] = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    if example.group is not None:
        row["group"] = example.group
    return ChatEncoding(row, sum(targets), truncated)
