"""Router-logit collection through module state, so no model code has to change.

Every :class:`~mola.layer.MolaLinear` of a model holds a reference to one shared
:class:`RouterLogitsStore`. While ``store.enabled`` is set, each layer appends its router logits
under its decoder-layer index; :class:`~mola.model.MolaModel` switches it on only for forwards that
need the logits (training with labels, analysis) and empties it afterwards, so generation and
evaluation keep nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor


class RouterLogitsStore:
    """Router logits of the current forward pass, per decoder layer, in module order."""

    def __init__(self) -> None:
        self.enabled = False
        self.logits: dict[int, list[tuple[str, Tensor]]] = {}

    def add(self, layer_idx: int | None, name: str, logits: Tensor) -> None:
        self.logits.setdefault(-1 if layer_idx is None else layer_idx, []).append((name, logits))

    def layer_logits(self, layer_idx: int) -> list[Tensor]:
        return [t for _, t in self.logits.get(layer_idx, [])]

    def clear(self) -> None:
        self.logits = {}

    @contextmanager
    def collecting(self) -> Iterator[RouterLogitsStore]:
        """Collect within the block; the logits stay readable until :meth:`clear`."""
        previous = self.enabled
        self.clear()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = previous
