"""How a model's auxiliary router losses add up over modules and layers.

Every router computes its losses for a *set* of routing records
(:meth:`~mola.routing.Router.layer_losses`, on the rows of the set's modules stacked). The
reduction (:data:`~mola.routing.REDUCTIONS`, config key ``aux_loss_reduction``, default the
router's own) says which records form a set and how the sets' losses combine:

* ``layer``: a set per decoder layer, summed over layers (MoLA; mola's oracle);
* ``module_sum`` / ``module_mean``: a set per adapted module, summed / averaged over all the
  model's modules (AdaMoLE and LoRAMoE sum, LD-MoLE averages);
* ``global``: one set holding every layer's records (DynMoLE: one loss over all layers' router
  logits concatenated);
* ``mixtral``: ``global`` with the balance loss' ``f_i`` counted per top-k slot, i.e. ``k`` times
  MoLA's share-normalised ``f_i`` (Hugging Face's ``load_balancing_loss_func`` for Mixtral, as
  MoE-PEFT's MixLoRA uses it).

Records are grouped by router kind and size first (``module_patterns`` may mix routers and
expert counts), and each group is reduced by its own router's reduction; ``global`` therefore
concatenates the layers whose routers have the same number of experts (the authors' models have
the same count in every layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mola.routing import Router, Routing, router_z_loss

Group = tuple[Router, list[Routing]]


def reduce_router_losses(
    layers: Mapping[int, Sequence[tuple[tuple, Router, list[Routing]]]],
    reduction: Callable[[Router], str],
    names: Sequence[str],
    device: torch.device,
    *,
    attention_mask: Tensor | None = None,
    context: Mapping[str, Any] | None = None,
    global_batch: bool = False,
    z_loss: bool = False,
) -> dict[str, Tensor]:
    """The unweighted losses by name, each aggregated by its router's reduction.

    Args:
        layers: per decoder layer, ``(key, router, records)`` groups (key: kind and size).
        reduction: the reduction name of a router.
        names: every loss name to report (zero when no router computes it).
        device: where the zeros live.
        attention_mask, context, global_batch: passed to ``layer_losses``.
        z_loss: also compute the router z-loss (aggregated the same way).
    """
    zero = torch.zeros((), device=device)
    totals = dict.fromkeys(names, zero)
    pending: dict[tuple, Group] = {}  # global/mixtral: records of all layers
    module_counts: dict[tuple, tuple[Router, int]] = {}
    module_sums: dict[tuple, dict[str, Tensor]] = {}

    def compute(router: Router, records: list[Routing]) -> dict[str, Tensor]:
        found = dict(router.layer_losses(records, attention_mask, context, global_batch))
        if z_loss:
            logits = [r.logits for r in records]
            found["router_z_loss"] = router_z_loss(logits, attention_mask, global_batch)
        return found

    def add(into: dict[str, Tensor], found: Mapping[str, Tensor]) -> None:
        for name, value in found.items():
            into[name] = into.get(name, zero) + value

    for idx in sorted(layers):
        for key, router, records in layers[idx]:
            how = reduction(router)
            if how == "layer":
                add(totals, compute(router, records))
            elif how in ("global", "mixtral"):
                pending.setdefault(key, (router, []))[1].extend(records)
            else:  # per module
                sums = module_sums.setdefault(key, {})
                for record in records:
                    add(sums, compute(router, [record]))
                count = module_counts.get(key, (router, 0))[1] + len(records)
                module_counts[key] = (router, count)
    for key, sums in module_sums.items():
        router, count = module_counts[key]
        scale = 1.0 / count if reduction(router) == "module_mean" else 1.0
        add(totals, {name: value * scale for name, value in sums.items()})
    for router, records in pending.values():
        found = compute(router, records)
        if reduction(router) == "mixtral" and "aux_loss" in found:
            found["aux_loss"] = found["aux_loss"] * (router.top_k or 1)
        add(totals, found)
    return totals
