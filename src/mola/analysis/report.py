"""How a MoLA adapter uses its experts: load, routing entropy, dead experts, balance, redundancy.

The MoLA paper's key evidence for a layer-wise allocation is that the experts of lower layers are
redundant (their weight updates differ little) and grow apart with depth. This module measures
that for any :class:`~mola.model.MolaModel`, per decoder layer and per adapted module:

* **expert load**: the share of the router's selected (token, expert) assignments that each
  expert receives, padding excluded (for the ``soft`` router every expert is selected, so look
  at ``mean_prob`` there);
* **routing entropy**: the mean per-token entropy of ``p = softmax(router logits)`` in nats, and
  its maximum ``log(E)``; ``normalised_entropy`` is their ratio (1 = uniform, 0 = one expert);
* **dead experts**: experts with a load below a threshold (default 1 %);
* **active experts**: the mean number of experts a token uses (``active_experts``) and its
  histogram (``active_hist``, tokens using 0..E experts), from the selection each module
  actually made; dynamic routers (``topp``, ``ldmole``, ``dynmole``, ``adamole``, ``relu``)
  vary it per token (``dynamic`` in the layer entry);
* **balance loss**: :func:`mola.routing.load_balancing_loss` of each layer, averaged over the
  batches weighted by their tokens (``balance_loss``), and the same formula on the statistics
  pooled over all the data (``balance_loss_pooled``);
* **expert redundancy** (weights only, no data): the mean pairwise Frobenius norm
  ``||dW_i - dW_j||_F`` of the experts' weight updates ``dW_e = scaling * B_e A_e``.

Typical notebook use::

    from mola.analysis.report import analyze, encode_batches, format_summary
    from mola.analysis.plots import save_plots

    batches = encode_batches(tokenizer, examples, batch_size=8)
    report = analyze(model, batches, progress=True)   # a plain, JSON-ready dict
    print(format_summary(report))
    save_plots(report, "figures/")                     # expert_load/redundancy/entropy.png

The same numbers are available as tensors: :func:`collect_routing` returns a
:class:`RoutingStats` (``stats.module(layer, "q_proj").load``, ``stats.layer(3).entropy``, ...)
and :func:`redundancy_stats` / :func:`pairwise_expert_distances` return the distance matrices.
The figures are drawn by :mod:`mola.plots` (:func:`~mola.plots.plot_expert_load`,
:func:`~mola.plots.plot_redundancy`, :func:`~mola.plots.plot_entropy` and the ``compare``
variants), each taking a report and an optional output path.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mola import __version__
from mola.analysis.redundancy import (
    METHODS,
    ModuleRedundancy,
    expert_redundancy,
    expert_update_norms,
    mean_pairwise,
    module_redundancy,
    pairwise_expert_distances,
    redundancy_stats,
)
from mola.core.injection import module_keys
from mola.routing import Router, load_balancing_loss
from mola.utils.tables import table as format_table

if TYPE_CHECKING:
    from mola.core.layer import MolaLinear
    from mola.core.model import MolaModel
    from mola.data.datasets import Example

__all__ = [
    "METHODS",
    "ModuleRedundancy",
    "RoutingCounts",
    "RoutingStats",
    "analyze",
    "build_report",
    "collect_routing",
    "encode_batches",
    "expert_load",
    "expert_redundancy",
    "expert_update_norms",
    "format_summary",
    "format_table",
    "mean_pairwise",
    "module_keys",
    "module_redundancy",
    "pairwise_expert_distances",
    "redundancy_stats",
    "routing_entropy",
]

REPORT_FORMAT = "mola-analysis"
"""The ``format`` field of a report (``analysis.json``)."""

REPORT_VERSION = 1
DEFAULT_DEAD_THRESHOLD = 0.01


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


# --------------------------------------------------------------------------- routing statistics


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


def _layer_routers(model: MolaModel) -> dict[int, Router]:
    routers: dict[int, Router] = {}
    for _, layer in model.mola_layers():
        idx = -1 if layer.layer_idx is None else layer.layer_idx
        if layer.routing is not None:  # a plain LoRA or FlyLoRA routes without a router
            routers.setdefault(idx, layer.routing)
    return routers


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def collect_routing(
    model: MolaModel,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    progress: bool = False,
    total: int | None = None,
) -> RoutingStats:
    """Run ``model`` over ``batches`` (no gradients, eval mode) and accumulate routing statistics.

    Args:
        model: the adapted model.
        batches: dicts with ``input_ids`` ``(B, T)`` and optionally ``attention_mask``; other keys
            (``labels``) are ignored. See :func:`encode_batches`.
        progress: show a tqdm bar over the batches (on stderr).
        total: the number of batches, for the bar (taken from ``len(batches)`` when possible).

    Returns:
        The accumulated :class:`RoutingStats`.
    """
    from tqdm.auto import tqdm

    routers = _layer_routers(model)
    if not routers:
        raise ValueError("the model has no MoLA layers to analyse")
    keys = module_keys(model)
    device = _device(model)
    extra: dict[str, Any] = {}
    try:
        if "logits_to_keep" in inspect.signature(model.base_model.forward).parameters:
            extra["logits_to_keep"] = 1  # only the router logits matter: skip the LM head work
    except (TypeError, ValueError):
        pass
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    stats = RoutingStats()
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(), model.capture_router_logits() as store:
            bar = tqdm(batches, total=total, desc="analyze", unit="batch", disable=not progress)
            for batch in bar:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = None if mask is None else mask.to(device)
                store.clear()
                model(input_ids=ids, attention_mask=mask, **extra)
                stats.update(store.logits, routers, mask, keys, store.records)
                store.clear()
    finally:
        model.router_store.clear()
        for module, mode in modes:  # restore each module's own flag, mixed states included
            module.training = mode
    return stats


def encode_batches(
    tokenizer: Any,
    examples: Sequence[Example],
    template: str = "alpaca",
    cutoff_len: int = 256,
    batch_size: int = 8,
) -> list[dict[str, Tensor]]:
    """Tokenise each example's prompt and gold response and pad them into batches.

    Examples are grouped by length (longest first) to keep padding small; padding is excluded
    from every statistic anyway.

    Raises:
        ValueError: ``batch_size`` below 1, no examples, or an encoding error.
    """
    from mola.data.prompts import DataCollator, encode_for_training

    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not examples:
        raise ValueError("no examples to analyse")
    features = []
    for example in examples:
        encoded = encode_for_training(tokenizer, example, template, cutoff_len)
        features.append({k: encoded[k] for k in ("input_ids", "attention_mask")})
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    collate = DataCollator(int(pad))
    return [
        collate([features[i] for i in order[start : start + batch_size]])
        for start in range(0, len(order), batch_size)
    ]


# --------------------------------------------------------------------------- report


def _num(value: float) -> float | None:
    """A JSON-safe float: ``None`` for NaN/inf."""
    value = float(value)
    return value if math.isfinite(value) else None


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def build_report(
    model: MolaModel,
    routing: RoutingStats | None = None,
    redundancy: Mapping[tuple[int, str], ModuleRedundancy] | None = None,
    *,
    dead_threshold: float = DEFAULT_DEAD_THRESHOLD,
) -> dict[str, Any]:
    """Gather routing and redundancy statistics into one plain, JSON-ready dict.

    Layers appear in ascending order; routing fields are ``None`` when ``routing`` is not given
    (a weights-only report), and so are values that are undefined (entropy ratio or redundancy
    of a single-expert layer). See :func:`analyze` for the layout.
    """
    _check_threshold(dead_threshold)
    if redundancy is None:
        redundancy = redundancy_stats(model)
    keys = module_keys(model)
    per_layer: dict[int, list[tuple[str, str, MolaLinear]]] = {}
    for name, layer in model.mola_layers():
        idx = -1 if layer.layer_idx is None else layer.layer_idx
        per_layer.setdefault(idx, []).append((keys[name], name, layer))
    order: list[str] = []
    for entries in per_layer.values():
        order += [key for key, _, _ in entries if key not in order]
    routing_fields = ("tokens", "load", "mean_prob", "entropy", "max_entropy")
    routing_fields += ("normalised_entropy", "dead_experts", "active_experts", "active_hist")
    layers = []
    for idx in sorted(per_layer):
        entries = per_layer[idx]
        first = entries[0][2]
        modules: dict[str, Any] = {}
        reds = [redundancy.get((idx, key)) or module_redundancy(lay) for key, _, lay in entries]
        for (key, name, _), red in zip(entries, reds, strict=True):
            entry: dict[str, Any] = {
                "name": name,
                "redundancy": _num(red.redundancy),
                "mean_expert_norm": _num(float(red.norms.mean())),
                "expert_norms": [_num(v) for v in red.norms.tolist()],
                "distances": [[_num(v) for v in row] for row in red.distances.tolist()],
            }
            seen = routing is not None and (idx, key) in routing.modules
            if seen:
                entry.update(routing.module(idx, key).to_dict(dead_threshold))
            else:
                entry.update(dict.fromkeys(routing_fields))
            modules[key] = entry
        routed = next((lay.routing for _, _, lay in entries if lay.routing is not None), None)
        item: dict[str, Any] = {
            "layer": idx,
            "num_experts": first.num_experts,
            "top_k": routed.top_k if routed is not None else None,
            "router": routed.name if routed is not None else None,
            "dynamic": routed is not None and bool(routed.dynamic),
            "r": first.r,
            "redundancy": _num(_nanmean(r.redundancy for r in reds)),
            "mean_expert_norm": _num(_nanmean(float(r.norms.mean()) for r in reds)),
        }
        if routing is not None and idx in routing.layers():
            item.update(routing.layer(idx).to_dict(dead_threshold))
            item["balance_loss"] = _num(routing.balance_loss(idx))
            item["balance_loss_pooled"] = _num(routing.pooled_balance_loss(idx))
        else:
            item.update(dict.fromkeys(routing_fields + ("balance_loss", "balance_loss_pooled")))
        item["modules"] = modules
        layers.append(item)
    config = model.mola_config.to_dict()
    dead = [len(item["dead_experts"] or []) for item in layers]
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "mola_version": __version__,
        "config": config,
        "allocation": model.allocation,
        "dead_threshold": dead_threshold,
        "has_routing": routing is not None,
        "tokens": routing.tokens if routing is not None else None,
        "batches": routing.batches if routing is not None else None,
        "modules": order,
        "num_dead_experts": sum(dead) if routing is not None else None,
        "layers": layers,
    }


def analyze(
    model: MolaModel,
    batches: Iterable[Mapping[str, Tensor]] | None = None,
    *,
    dead_threshold: float = DEFAULT_DEAD_THRESHOLD,
    progress: bool = False,
    method: str = "auto",
) -> dict[str, Any]:
    """Analyse an adapted model: redundancy from its weights, routing from ``batches`` if given.

    Args:
        model: the adapted model (its weights are not changed).
        batches: padded batches (see :func:`encode_batches`), or ``None`` for weights only.
        dead_threshold: an expert with a load below this is reported dead.
        progress: show a progress bar over the batches.
        method: redundancy method (see :func:`pairwise_expert_distances`).

    Returns:
        A JSON-ready dict: ``format``, ``version``, ``config`` (the adapter's MolaConfig),
        ``allocation``, ``dead_threshold``, ``has_routing``, ``tokens``, ``modules`` (module keys
        in model order), ``num_dead_experts`` and ``layers``: one dict per decoder layer with
        ``layer``, ``num_experts``, ``top_k``, ``r``, ``redundancy``, ``mean_expert_norm``,
        the layer-pooled routing numbers (``tokens``, ``load``, ``mean_prob``, ``entropy``,
        ``max_entropy``, ``normalised_entropy``, ``dead_experts``, ``balance_loss``,
        ``balance_loss_pooled``) and ``modules``: ``{key: {name, redundancy, mean_expert_norm,
        expert_norms, distances, and the same routing numbers}}``.

    Raises:
        ValueError: bad ``dead_threshold`` or ``method``.
    """
    _check_threshold(dead_threshold)
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose from {', '.join(METHODS)}")
    redundancy = redundancy_stats(model, method=method)
    routing = collect_routing(model, batches, progress=progress) if batches is not None else None
    return build_report(model, routing, redundancy, dead_threshold=dead_threshold)


# --------------------------------------------------------------------------- terminal summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _dead_text(dead: list[int] | None) -> str:
    if dead is None:
        return "-"
    if not dead:
        return "0"
    listed = ",".join(map(str, dead[:4])) + (",…" if len(dead) > 4 else "")
    return f"{len(dead)} ({listed})"


def format_summary(report: Mapping[str, Any], *, per_module: bool = True) -> str:
    """A terminal summary of a report: one row per layer, then per-module tables.

    Args:
        report: a report from :func:`analyze` (or a loaded ``analysis.json``).
        per_module: also print layer x module tables of redundancy (and entropy / log E).
    """
    routed = bool(report.get("has_routing"))
    out = []
    title = report.get("label") or report.get("adapter") or "adapter"
    line = f"MoLA analysis of {title}"
    if routed:
        line += f": {report.get('tokens')} tokens"
        if report.get("data", {}) and report["data"].get("examples") is not None:
            line += f" from {report['data']['examples']} examples"
        line += f"; dead = load < {report.get('dead_threshold'):g}"
    out.append(line)
    headers = ["layer", "E", "k", "r"]
    if routed:
        headers += ["entropy/logE", "balance", "min load", "max load", "dead"]
    headers += ["redundancy", "|dW|"]
    rows = []
    for item in report["layers"]:
        row = [str(item["layer"]), str(item["num_experts"]), str(item["top_k"] or "-")]
        row.append(str(item["r"]))
        if routed:
            load = item["load"] or []
            row += [
                _fmt(item["normalised_entropy"], ".3f"),
                _fmt(item["balance_loss"], ".3f"),
                _fmt(min(load), ".3f") if load else "-",
                _fmt(max(load), ".3f") if load else "-",
                _dead_text(item["dead_experts"]),
            ]
        row += [_fmt(item["redundancy"], ".4g"), _fmt(item["mean_expert_norm"], ".4g")]
        rows.append(row)
    out.append(format_table(headers, rows))
    if per_module and report.get("modules"):
        tables = [("redundancy", ".4g", "Redundancy (mean pairwise ||dW_i - dW_j||_F) by module")]
        if routed:
            tables.append(("normalised_entropy", ".3f", "Routing entropy / log(E) by module"))
        for field, spec, caption in tables:
            rows = []
            for item in report["layers"]:
                mods = item["modules"]
                cells = [_fmt(mods[m][field], spec) if m in mods else "" for m in report["modules"]]
                rows.append([str(item["layer"]), *cells])
            out += ["", caption, format_table(["layer", *report["modules"]], rows)]
    return "\n".join(out)
