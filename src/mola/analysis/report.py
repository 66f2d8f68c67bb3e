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

This module assembles the report; the pieces live in :mod:`mola.analysis.routing` (routing
statistics), :mod:`mola.analysis.collect` (running the model over batches),
:mod:`mola.analysis.redundancy` (weights only) and :mod:`mola.analysis.summary` (terminal text),
and are re-exported here. The same numbers are available as tensors: :func:`collect_routing`
returns a :class:`RoutingStats` (``stats.module(layer, "q_proj").load``,
``stats.layer(3).entropy``, ...) and :func:`redundancy_stats` /
:func:`pairwise_expert_distances` return the distance matrices.
The figures are drawn by :mod:`mola.plots` (:func:`~mola.plots.plot_expert_load`,
:func:`~mola.plots.plot_redundancy`, :func:`~mola.plots.plot_entropy` and the ``compare``
variants), each taking a report and an optional output path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mola import __version__
from mola.analysis.collect import collect_routing, encode_batches
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
from mola.analysis.routing import (
    DEFAULT_DEAD_THRESHOLD,
    RoutingCounts,
    RoutingStats,
    _check_threshold,
    _num,
    expert_load,
    routing_entropy,
)
from mola.analysis.summary import format_summary, format_table
from mola.core.model import module_keys

if TYPE_CHECKING:
    from mola.core.layer import MolaLinear
    from mola.core.model import MolaModel

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
