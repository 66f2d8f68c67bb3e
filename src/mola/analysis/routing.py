"""Routing statistics of a MoLA adapter: expert load, routing entropy, dead and active experts.

* **expert load**: the share of the router's selected (token, expert) assignments that each
  expert receives, padding excluded (for the ``soft`` router every expert is selected, so look
  at ``mean_prob`` there);
* **routing entropy**: the mean per-token entropy of ``p = softmax(router logits)`` in nats, and
  its maximum ``log(E)``; ``normalised_entropy`` is their ratio (1 = uniform, 0 = one expert);
* **dead experts**: experts with a load below a threshold (default 1 %);
* **active experts**: the mean number of experts a token uses (``active_experts``) and its
  histogram (``active_hist``, tokens using 0..E experts), from the selection each module
  actually made;
* **balance loss**: :func:`mola.routing.load_balancing_loss` of each layer, averaged over the
  batches weighted by their tokens, and the same formula on the statistics pooled over all data.

:class:`RoutingCounts` holds the sums of one module (or layer), :class:`RoutingStats` accumulates
them over batches per (decoder layer, module); :func:`mola.analysis.collect.collect_routing` runs
a model over batches to fill one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mola.routing import Router, load_balancing_loss

DEFAULT_DEAD_THRESHOLD = 0.01


def _num(value: float) -> float | None:
    """A JSON-safe float: ``None`` for NaN/inf."""
    value = float(value)
    return value if math.isfinite(value) else None


def _check_threshold(dead_threshold: float) -> None:
    if not 0.0 <= dead_threshold < 1.0:
        raise ValueError(f"dead_threshold: must be in [0, 1), got {dead_threshold}")


def _keep_rows(attention_mask: Tensor | None, rows: int, device: torch.device) -> Tensor | None:
    """The flattened padding mask as a bool ``(rows,)`` tensor, or ``None`` without a mask."""
    if attention_mask is None:
        return None
    keep = attention_mask.reshape(-1).to(device=device) != 0
    if keep.shape[0] != rows:
        raise ValueError(
            f"attention_mask has {keep.shape[0]} tokens but the router logits have {rows} rows; "
            f"pass the mask of the batch the logits came from"
        )
    return keep


@dataclass
class RoutingCounts:
    """Routing sums of one module (or one whole layer) over the tokens seen, padding excluded.

    Attributes:
        counts: ``(E,)`` float64, how many selected (token, expert) assignments each expert got.
        prob_sum: ``(E,)`` float64, the summed router probabilities of each expert.
        entropy_sum: the summed per-row entropy of the router probabilities (nats).
        rows: the number of routed rows (tokens; tokens x modules for a layer).
        active_hist: ``(E + 1,)`` float64, how many rows used 0, 1, ..., E experts.
    """

    counts: Tensor
    prob_sum: Tensor
    entropy_sum: float = 0.0
    rows: int = 0
    active_hist: Tensor | None = None

    @classmethod
    def from_logits(
        cls, logits: Tensor, router: Router, attention_mask: Tensor | None = None
    ) -> RoutingCounts:
        """Reduce router logits ``(N, E)`` (or ``(B, T, E)``) of one module to counts.

        Args:
            logits: the module's router logits.
            router: decides which assignments are selected (``router.select``).
            attention_mask: optional ``(B, T)`` mask aligned with the rows; 0 marks padding.
        """
        return _reduce([logits], router, attention_mask)[0]

    def __add__(self, other: RoutingCounts) -> RoutingCounts:
        if other.num_experts != self.num_experts:
            raise ValueError(
                f"cannot add routing counts of {other.num_experts} and {self.num_experts} experts"
            )
        hist = self.active_hist
        if hist is None or other.active_hist is None:
            hist = hist if other.active_hist is None else other.active_hist
        else:
            hist = hist + other.active_hist
        return RoutingCounts(
            self.counts + other.counts,
            self.prob_sum + other.prob_sum,
            self.entropy_sum + other.entropy_sum,
            self.rows + other.rows,
            hist,
        )

    @property
    def active_experts(self) -> float:
        """Mean number of experts a token uses (NaN without rows)."""
        hist = self.active_hist
        if hist is None or float(hist.sum()) == 0:
            return math.nan
        return float((hist * torch.arange(hist.shape[0], dtype=hist.dtype)).sum() / hist.sum())

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[0])

    @property
    def load(self) -> Tensor:
        """``(E,)`` share of the selected assignments per expert (sums to 1; zeros if no rows)."""
        total = self.counts.sum()
        return self.counts / total if total > 0 else torch.zeros_like(self.counts)

    @property
    def mean_prob(self) -> Tensor:
        """``(E,)`` mean router probability per expert."""
        return self.prob_sum / max(self.rows, 1)

    @property
    def entropy(self) -> float:
        """Mean per-token routing entropy in nats (NaN without rows)."""
        return self.entropy_sum / self.rows if self.rows else math.nan

    @property
    def max_entropy(self) -> float:
        """``log(E)``, the entropy of a uniform router."""
        return math.log(self.num_experts)

    @property
    def normalised_entropy(self) -> float:
        """``entropy / log(E)`` in [0, 1]; NaN for a single expert or without rows."""
        return self.entropy / self.max_entropy if self.num_experts > 1 else math.nan

    def dead_experts(self, threshold: float = DEFAULT_DEAD_THRESHOLD) -> list[int]:
        """Experts whose load is below ``threshold`` (none when nothing was routed)."""
        _check_threshold(threshold)
        if self.rows == 0:
            return []
        return [i for i, share in enumerate(self.load.tolist()) if share < threshold]

    def balance_loss(self) -> float:
        """``E * sum_i f_i P_i`` (the load-balancing loss formula) on these pooled sums."""
        return float(self.num_experts * (self.load * self.mean_prob).sum())

    def to_dict(self, dead_threshold: float = DEFAULT_DEAD_THRESHOLD) -> dict[str, Any]:
        """The numbers as plain Python values (NaN becomes ``None``)."""
        return {
            "tokens": self.rows,
            "load": [_num(v) for v in self.load.tolist()],
            "mean_prob": [_num(v) for v in self.mean_prob.tolist()],
            "entropy": _num(self.entropy),
            "max_entropy": _num(self.max_entropy),
            "normalised_entropy": _num(self.normalised_entropy),
            "dead_experts": self.dead_experts(dead_threshold),
            "active_experts": _num(self.active_experts),
            "active_hist": None if self.active_hist is None else self.active_hist.tolist(),
        }


def _reduce(
    logits: Sequence[Tensor],
    router: Router,
    attention_mask: Tensor | None,
    masks: Sequence[Tensor] | None = None,
) -> list[RoutingCounts]:
    """Per-module :class:`RoutingCounts` of same-shaped logits, in one pass for all modules.

    ``masks``: the experts each row actually used (recorded by the layers); by default
    ``router.select(softmax(logits))``, which only the softmax-rule routers define.
    """
    rows = [t.reshape(-1, t.shape[-1]) for t in logits]
    if len({r.shape for r in rows}) > 1:
        return [
            _reduce([t], router, attention_mask, None if masks is None else [masks[i]])[0]
            for i, t in enumerate(logits)
        ]
    num, (tokens, experts) = len(rows), rows[0].shape
    probs = torch.softmax(torch.cat(rows).float(), dim=-1)
    if masks is None:
        _, mask = router.select(probs)
    else:
        mask = torch.cat([m.reshape(-1, m.shape[-1]) for m in masks]).bool()
    entropy = torch.special.entr(probs).sum(dim=-1)
    active = torch.nn.functional.one_hot(mask.sum(dim=-1), experts + 1).double()
    keep = _keep_rows(attention_mask, tokens, probs.device)
    if keep is not None:
        keep_all = keep.repeat(num)
        mask = mask & keep_all[:, None]
        probs = probs * keep_all[:, None]
        entropy = entropy * keep_all
        active = active * keep_all[:, None]
    sums = torch.cat(
        [
            mask.view(num, tokens, experts).sum(dim=1).double(),
            probs.view(num, tokens, experts).sum(dim=1).double(),
            active.view(num, tokens, experts + 1).sum(dim=1),
            entropy.view(num, tokens).sum(dim=1, keepdim=True).double(),
        ],
        dim=1,
    ).cpu()  # one transfer per call
    count = tokens if keep is None else int(keep.sum())
    e = experts
    return [
        RoutingCounts(row[:e], row[e : 2 * e], float(row[-1]), count, row[2 * e : 3 * e + 1])
        for row in sums
    ]


def expert_load(logits: Tensor, router: Router, attention_mask: Tensor | None = None) -> Tensor:
    """Share of the selected (token, expert) assignments per expert, padding excluded.

    Args:
        logits: router logits ``(N, E)`` or ``(B, T, E)``.
        router: the layer's router (its ``select`` decides what is assigned).
        attention_mask: optional ``(B, T)`` mask; 0 marks padding.

    Returns:
        A float64 ``(E,)`` tensor summing to 1.
    """
    return RoutingCounts.from_logits(logits, router, attention_mask).load


def routing_entropy(logits: Tensor, attention_mask: Tensor | None = None) -> float:
    """Mean per-token entropy (nats) of ``softmax(logits)``, padding excluded; at most log(E)."""
    z = logits.reshape(-1, logits.shape[-1]).float()
    entropy = torch.special.entr(torch.softmax(z, dim=-1)).sum(dim=-1)
    keep = _keep_rows(attention_mask, z.shape[0], z.device)
    if keep is None:
        return float(entropy.mean())
    return float(entropy[keep].mean()) if keep.any() else math.nan


class RoutingStats:
    """Routing statistics accumulated over batches, per (decoder layer, module).

    Feed it the logits of each forward (:meth:`update`), or let :func:`collect_routing` do it.
    Module counts are kept per batch-reduced sum, so no logits are held between batches.

    Attributes:
        modules: ``{(layer, module key): RoutingCounts}`` in the order first seen.
        names: ``{(layer, module key): qualified module name}``.
        tokens: non-padding tokens seen.
        batches: forwards seen.
    """

    def __init__(self) -> None:
        self.modules: dict[tuple[int, str], RoutingCounts] = {}
        self.names: dict[tuple[int, str], str] = {}
        self.tokens = 0
        self.batches = 0
        self._balance: dict[int, list[float]] = {}  # layer -> [token-weighted sum, tokens]

    def update(
        self,
        logits: Mapping[int, Sequence[tuple[str, Tensor]]],
        routers: Mapping[int, Router],
        attention_mask: Tensor | None = None,
        keys: Mapping[str, str] | None = None,
        records: Mapping[int, Sequence[tuple[str, Any]]] | None = None,
    ) -> None:
        """Add one forward's router logits (``RouterLogitsStore.logits``).

        Args:
            logits: ``{layer: [(module name, logits (N, E)), ...]}``.
            routers: the router of each layer.
            attention_mask: the batch's ``(B, T)`` mask (rows of every module align with it).
            keys: maps qualified module names to short keys (default: the name itself).
            records: ``RouterLogitsStore.records``, the routing each module used (its selection
                masks count instead of ``router.select``; needed for learned routers).

        Raises:
            ValueError: a layer has no router, or the mask does not match the logits.
        """
        batch_tokens = None
        for layer, entries in logits.items():
            if not entries:
                continue
            if layer not in routers:
                raise ValueError(f"no router given for decoder layer {layer}")
            router = routers[layer]
            masks = None
            if records is not None and len(records.get(layer, ())) == len(entries):
                masks = [r.mask for _, r in records[layer]]
            reduced = _reduce([t for _, t in entries], router, attention_mask, masks)
            for (name, _), counts in zip(entries, reduced, strict=True):
                key = (layer, keys.get(name, name) if keys else name)
                previous = self.modules.get(key)
                self.modules[key] = counts if previous is None else previous + counts
                self.names.setdefault(key, name)
                batch_tokens = counts.rows
            logits_only = [t for _, t in entries]
            balance = float(load_balancing_loss(logits_only, router, attention_mask, masks=masks))
            slot = self._balance.setdefault(layer, [0.0, 0.0])
            slot[0] += balance * batch_tokens
            slot[1] += batch_tokens
        if batch_tokens is not None:
            self.tokens += batch_tokens
            self.batches += 1

    def layers(self) -> list[int]:
        """Decoder layers seen, ascending."""
        return sorted({layer for layer, _ in self.modules})

    def module_keys(self, layer: int) -> list[str]:
        """Module keys of ``layer`` in the order seen."""
        return [key for idx, key in self.modules if idx == layer]

    def module(self, layer: int, key: str) -> RoutingCounts:
        """The sums of one module (``KeyError`` if never seen)."""
        return self.modules[(layer, key)]

    def layer(self, layer: int) -> RoutingCounts:
        """The sums of all of a layer's modules together (rows = tokens x modules)."""
        parts = [self.modules[(layer, key)] for key in self.module_keys(layer)]
        if not parts:
            raise KeyError(f"no routing statistics for decoder layer {layer}")
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def balance_loss(self, layer: int) -> float:
        """The layer's :func:`~mola.routing.load_balancing_loss`, token-weighted over batches."""
        total, weight = self._balance.get(layer, (0.0, 0.0))
        return total / weight if weight else math.nan

    def pooled_balance_loss(self, layer: int) -> float:
        """The load-balancing loss formula applied to the statistics pooled over all batches."""
        return self.layer(layer).balance_loss()
