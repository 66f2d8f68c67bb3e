"""Router-output collection through module state, so no model code has to change.

Every :class:`~mola.layer.MolaLinear` of a model holds a reference to one shared
:class:`RouterLogitsStore`. While ``store.enabled`` is set, each layer appends its
:class:`~mola.routing.Routing` (logits, gates, selection, router extras) under its decoder-layer
index; :class:`~mola.model.MolaModel` switches it on only for forwards that need them (training
with labels, analysis) and empties it afterwards, so generation and evaluation keep nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from mola.routing.base import Routing


class RouterLogitsStore:
    """Router outputs of the current forward pass, per decoder layer, in module order.

    Attributes:
        logits: ``{layer: [(module name, logits (N, E)), ...]}``.
        records: ``{layer: [(module name, Routing), ...]}``, the same modules in the same order.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.logits: dict[int, list[tuple[str, Tensor]]] = {}
        self.records: dict[int, list[tuple[str, Routing]]] = {}

    def add(self, layer_idx: int | None, name: str, routing: Routing | Tensor) -> None:
        """Keep one module's routing (or bare logits, recorded without a decision)."""
        idx = -1 if layer_idx is None else layer_idx
        logits = routing.logits if isinstance(routing, Routing) else routing
        self.logits.setdefault(idx, []).append((name, logits))
        if isinstance(routing, Routing):
            self.records.setdefault(idx, []).append((name, routing))

    def layer_logits(self, layer_idx: int) -> list[Tensor]:
        return [t for _, t in self.logits.get(layer_idx, [])]

    def layer_records(self, layer_idx: int) -> list[Routing]:
        return [r for _, r in self.records.get(layer_idx, [])]

    def clear(self) -> None:
        self.logits = {}
        self.records = {}

    @contextmanager
    def collecting(self) -> Iterator[RouterLogitsStore]:
        """Collect within the block; the outputs stay readable until :meth:`clear`."""
        previous = self.enabled
        self.clear()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = previous
