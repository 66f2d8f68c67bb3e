"""The example record shared by every data loader, and the error they raise on bad data."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Invalid user data or data options; the message is one line meant for the user."""


@dataclass
class Example:
    """One training or evaluation example.

    Attributes:
        instruction: The task or question text.
        input: Optional context for the instruction ("" when absent).
        output: The reference response; for multiple-choice examples, the gold choice text.
        choices: The candidate answers of a multiple-choice example, else ``None``.
        group: The example's type (an int >= 0; LoRAMoE's localized balancing), else ``None``.
        messages: A whole conversation (``role``/``content`` dicts, roles ``system``, ``user``
            and ``assistant``) for chat data, else ``None``; ``instruction`` is then its first
            user turn and ``output`` its last assistant turn.
    """

    instruction: str
    input: str = ""
    output: str = ""
    choices: list[str] | None = None
    group: int | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def label(self) -> int | None:
        """Index of ``output`` in ``choices``, or ``None`` when it is not a choice."""
        if not self.choices or self.output not in self.choices:
            return None
        return self.choices.index(self.output)
