"""Fold adapted modules into the base weights where that is exact.

A module folds exactly when its update does not depend on the routing:

- one expert (a plain LoRA) under a router whose gate for a single expert is 1 (``topk``,
  ``switch``, ``topp``, ``soft``): ``W' = W + scaling * B_0 A_0``;
- several experts whose updates are all equal (redundancy distance 0) under a router whose gates
  sum to 1 (``topk``, ``topp``, ``soft``): the sum of gates times one update is that update.

Anything else (two different experts under any router, ``switch`` gates below 1, other expert
structures) depends on each token's gates and cannot be folded into a fixed weight; the plan says
why, per module. :func:`fold_modules` puts the base layer (with the folded weight) back in place
of each folded :class:`~mola.core.layer.MolaLinear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mola.analysis.redundancy import expert_update_norms, pairwise_expert_distances
from mola.core.layer import MolaLinear
from mola.core.model import MolaModel
from mola.inference import access

# relative distance below which experts count as equal (fp32 storage rounding)
EQUAL_TOLERANCE = 1e-6


@dataclass
class MergeDecision:
    """Whether one module folds into its base weight, and why (not)."""

    module: str
    layer: int | None
    num_experts: int
    router: str
    mergeable: bool
    reason: str


def decide(name: str, layer: MolaLinear) -> MergeDecision:
    """The :class:`MergeDecision` for one adapted module."""
    router = access.router_name(layer)
    decision = MergeDecision(name, layer.layer_idx, layer.num_experts, router, False, "")
    reason = access.unsupported_reason(layer)
    if reason is not None:
        decision.reason = reason
        return decision
    if layer.num_experts == 1:
        decision.mergeable, decision.reason = True, "one expert: a plain LoRA"
        return decision
    a, b = access.factors(layer)
    with torch.no_grad():
        dist = pairwise_expert_distances(a, b, access.scaling(layer))
        norms = expert_update_norms(a, b, access.scaling(layer))
    scale = float(norms.max())
    if float(dist.max()) > EQUAL_TOLERANCE * max(scale, 1e-30) and scale > 0:
        decision.reason = (
            f"{layer.num_experts} different experts mixed per token by {router!r} routing "
            f"(max update distance {float(dist.max()):.3g})"
        )
    elif router not in access.SUM_ONE_ROUTERS:
        decision.reason = f"equal experts, but {router!r} gates do not sum to 1"
    else:
        decision.mergeable, decision.reason = True, "all experts equal, gates sum to 1"
    return decision


def merge_plan(model: MolaModel) -> list[MergeDecision]:
    """One :class:`MergeDecision` per adapted module, in model order."""
    return [decide(name, layer) for name, layer in model.mola_layers()]


def folded_weight(layer: MolaLinear) -> torch.Tensor:
    """The base weight plus expert 0's update, in the base weight's layout and dtype."""
    a, b = access.factors(layer)
    weight = layer.base_layer.weight
    with torch.no_grad():
        delta = access.scaling(layer) * (b[0].double() @ a[0].double())  # (d_out, d_in)
        if not isinstance(layer.base_layer, nn.Linear):  # GPT-2 Conv1D keeps (d_in, d_out)
            delta = delta.T
        return (weight.double() + delta.to(weight.device)).to(weight.dtype)


def fold_modules(model: MolaModel, names: set[str]) -> int:
    """Fold the modules ``names`` (each must be mergeable) into their base layers, in place.

    Returns:
        How many modules were folded.

    Raises:
        ValueError: a named module is not mergeable.
    """
    plan = {d.module: d for d in merge_plan(model)}
    count = 0
    for name in sorted(names):
        decision = plan.get(name)
        if decision is None or not decision.mergeable:
            why = "not an adapted module" if decision is None else decision.reason
            raise ValueError(f"{name} cannot be merged: {why}")
        layer = model.base_model.get_submodule(name)
        base = layer.base_layer
        with torch.no_grad():
            base.weight.copy_(folded_weight(layer))
        parent, _, child = name.rpartition(".")
        setattr(model.base_model.get_submodule(parent) if parent else model.base_model, child, base)
        count += 1
    return count
