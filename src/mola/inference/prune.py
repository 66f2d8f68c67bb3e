"""Expert pruning: drop experts the router hardly uses, merge experts that learned the same update.

For every adapted module, given each expert's routing load on some data (its share of the
selected assignments, see :func:`mola.inference.loads.measure_loads`):

1. **drop** the experts whose load is below ``min_load`` (the most used expert always stays);
2. **merge** near-identical experts among the rest: experts ``i`` and ``j`` are near-identical
   when the redundancy distance ``||scaling (B_i A_i - B_j A_j)||_F`` (what ``mola analyze``
   reports, :func:`mola.analysis.redundancy.pairwise_expert_distances`) is at most
   ``merge_threshold * max(||dW_i||, ||dW_j||)``. Experts are visited from the most to the least
   used; each expert not yet absorbed keeps itself and absorbs every later near-identical one.
   The kept expert is the group's most used one, with its own ``A``, ``B`` and router row;
3. **rewrite the router** consistently: its rows are the kept experts' rows in the kept order,
   the :class:`~mola.routing.Router` is rebuilt for the new count, and ``top_k`` becomes
   ``min(top_k, experts left)``.

What is exact: with the ``topk`` router, dropping an expert that no token selects leaves every
output unchanged (the softmax of the kept logits keeps their ratios and the top-k set, and top-k
gates are renormalised). Merging changes routing (the absorbed experts' probability mass is not
moved to the kept one: a bias-free router cannot express ``log(e^{z_i} + e^{z_j})``), so
``mola prune`` reports accuracy before and after.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from mola.analysis.redundancy import expert_update_norms, pairwise_expert_distances
from mola.core.model import MolaModel
from mola.inference import access


def plan_module(
    load: Tensor,
    distances: Tensor,
    norms: Tensor,
    min_load: float,
    merge_threshold: float,
) -> tuple[list[int], list[int], list[list[int]]]:
    """``(kept, dropped, merged groups)`` for one module's experts.

    Args:
        load: ``(E,)`` routing load shares.
        distances: ``(E, E)`` pairwise update distances.
        norms: ``(E,)`` update norms.
        min_load: drop experts with a smaller load.
        merge_threshold: relative distance at or below which two experts are merged (< 0: never).

    Returns:
        ``kept`` expert indices (most used first), ``dropped`` ones, and each merge group as
        ``[kept expert, absorbed...]`` (only groups of two or more).
    """
    order = sorted(range(load.shape[0]), key=lambda e: (-float(load[e]), e))
    survivors = [e for e in order if float(load[e]) >= min_load] or order[:1]
    dropped = sorted(set(order) - set(survivors))
    kept: list[int] = []
    groups: list[list[int]] = []
    absorbed: set[int] = set()
    for i in survivors:
        if i in absorbed:
            continue
        kept.append(i)
        group = [i]
        for j in survivors:
            if j in absorbed or j in kept or j == i:
                continue
            scale = max(float(norms[i]), float(norms[j]))
            if merge_threshold >= 0 and float(distances[i, j]) <= merge_threshold * scale:
                group.append(j)
                absorbed.add(j)
        if len(group) > 1:
            groups.append(group)
    return kept, dropped, groups


def prune_model(
    model: MolaModel,
    loads: dict[str, Tensor],
    min_load: float = 0.01,
    merge_threshold: float = 0.05,
) -> list[dict[str, Any]]:
    """Prune every adapted module of ``model`` in place; one report entry per module.

    Args:
        model: the adapted model.
        loads: ``{module name: (E,) load}`` (:func:`~mola.inference.loads.measure_loads`).
        min_load: experts with a smaller share of the assignments are dropped.
        merge_threshold: relative update distance at or below which experts merge; < 0: never.

    Returns:
        Per module: ``module``, ``layer``, ``experts_before``, ``experts_after``, ``top_k_before``,
        ``top_k_after``, ``load`` (before), ``dropped``, ``merged`` and ``skipped`` (a reason, or
        ``None``).

    Raises:
        ValueError: ``min_load`` outside [0, 1), or a module's load missing or of the wrong size.
    """
    if not 0.0 <= min_load < 1.0:
        raise ValueError(f"--min-load: must be in [0, 1), got {min_load}")
    report = []
    for name, layer in model.mola_layers():
        num = layer.num_experts
        top_k = getattr(layer.routing, "top_k", None)
        entry: dict[str, Any] = {
            "module": name,
            "layer": layer.layer_idx,
            "experts_before": num,
            "experts_after": num,
            "top_k_before": top_k,
            "top_k_after": top_k,
            "load": None,
            "dropped": [],
            "merged": [],
            "skipped": access.unsupported_reason(layer),
        }
        report.append(entry)
        if entry["skipped"]:
            continue
        load = loads.get(name)
        if load is None or load.shape[0] != num:
            raise ValueError(f"no routing load of the right size for {name} ({num} experts)")
        entry["load"] = [round(float(v), 6) for v in load]
        if num == 1:
            continue
        a, b = access.factors(layer)
        scale = access.scaling(layer)
        with torch.no_grad():
            distances = pairwise_expert_distances(a, b, scale)
            norms = expert_update_norms(a, b, scale)
        kept, dropped, groups = plan_module(load, distances, norms, min_load, merge_threshold)
        if len(kept) == num:
            continue
        new_k = None if top_k is None else min(top_k, len(kept))
        access.keep_experts(layer, kept, new_k)
        entry.update(experts_after=len(kept), top_k_after=new_k, dropped=dropped, merged=groups)
    return report


def layer_summary(report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per decoder layer: experts before and after (summed over modules), dropped, merged."""
    layers: dict[int, dict[str, Any]] = {}
    for entry in report:
        idx = -1 if entry["layer"] is None else entry["layer"]
        row = layers.setdefault(
            idx, {"layer": idx, "before": 0, "after": 0, "dropped": 0, "merged": 0}
        )
        row["before"] += entry["experts_before"]
        row["after"] += entry["experts_after"]
        row["dropped"] += len(entry["dropped"])
        row["merged"] += sum(len(g) - 1 for g in entry["merged"])
    return [layers[k] for k in sorted(layers)]


def pruned_patterns(model: MolaModel, report: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``module_patterns`` entries that rebuild the pruned modules exactly (exact-name regexes).

    Each entry carries the module's full resolved settings, since the first matching pattern
    replaces the config's values for that module. They go in front of any existing patterns.
    """
    config = model.mola_config
    num_layers = len(model.allocation["num_experts"])
    out: dict[str, dict[str, Any]] = {}
    for entry in report:
        if entry["experts_after"] == entry["experts_before"]:
            continue
        name, idx = entry["module"], entry["layer"]
        spec = config.module_spec(name, idx, num_layers)
        out[re.escape(name)] = {
            "num_experts": entry["experts_after"],
            "top_k": entry["top_k_after"],
            "r": spec.r,
            "lora_alpha": spec.lora_alpha,
            "router": spec.router,
            "experts_structure": spec.experts_structure,
        }
    return out
