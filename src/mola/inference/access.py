"""Reading and rewriting one adapted module's stacked experts and router, in one place.

Pruning and merging work on *stacked* experts (``lora_A (E, r, d_in)``, ``lora_B (E, d_out, r)``)
with a learned linear router of ``E`` rows over ``x``; these helpers find those tensors on a
:class:`~mola.core.layer.MolaLinear` and say, in words, why a module has another form.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mola.core.layer import MolaLinear
from mola.routing import build_router

# Routers whose gates for a single expert are exactly 1, and whose gates always sum to 1.
UNIT_GATE_ROUTERS = frozenset({"topk", "switch", "topp", "soft", "none"})
SUM_ONE_ROUTERS = frozenset({"topk", "topp", "soft"})


def experts_module(layer: MolaLinear) -> nn.Module:
    """The module holding ``lora_A`` and ``lora_B`` (the layer itself or its ``experts``)."""
    holder = getattr(layer, "experts", None)
    return holder if isinstance(holder, nn.Module) else layer


def router_linear(layer: MolaLinear) -> nn.Module | None:
    """The layer's own router when it is a linear map (a weight ``(E, d_in)``), else ``None``."""
    router = getattr(layer, "router", None)
    weight = getattr(router, "weight", None)
    return router if isinstance(weight, Tensor) and weight.dim() == 2 else None


def router_name(layer: MolaLinear) -> str:
    """The routing rule's name; ``none`` for a module without a router (one expert)."""
    routing = layer.routing
    return "none" if routing is None else str(getattr(routing, "name", type(routing).__name__))


def unsupported_reason(layer: MolaLinear) -> str | None:
    """Why the module's experts cannot be pruned or folded here, or ``None`` when they can."""
    holder = experts_module(layer)
    structure = getattr(holder, "structure", "stacked")
    if structure != "stacked":
        return f"experts_structure {structure!r} (only stacked experts are supported)"
    a, b = getattr(holder, "lora_A", None), getattr(holder, "lora_B", None)
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.dim() != 3 or b.dim() != 3:
        return "no stacked lora_A (E, r, d_in) / lora_B (E, d_out, r)"
    if layer.routing is None and a.shape[0] == 1:
        return None  # one expert without a router: a plain LoRA
    router = router_linear(layer)
    if router is None or router.bias is not None or router.weight.shape[0] != a.shape[0]:
        return "its router is not a bias-free linear map with one row per expert"
    if router_name(layer) not in UNIT_GATE_ROUTERS:
        return f"router {router_name(layer)!r} (supported: {', '.join(sorted(UNIT_GATE_ROUTERS))})"
    return None


def factors(layer: MolaLinear) -> tuple[Tensor, Tensor]:
    """``(lora_A (E, r, d_in), lora_B (E, d_out, r))``."""
    holder = experts_module(layer)
    return holder.lora_A, holder.lora_B


def scaling(layer: MolaLinear) -> float:
    return float(getattr(experts_module(layer), "scaling", layer.scaling))


def keep_experts(layer: MolaLinear, keep: list[int], top_k: int | None) -> None:
    """Keep only experts ``keep`` (in that order): rows of ``lora_A``, ``lora_B``, the router.

    The layer's router object is rebuilt for the new count with ``top_k``; parameters keep their
    ``requires_grad`` flags, device and dtype.
    """
    holder = experts_module(layer)
    index = torch.tensor(keep, dtype=torch.long, device=holder.lora_A.device)
    router = router_linear(layer)
    assert router is not None
    with torch.no_grad():
        for owner, name in ((holder, "lora_A"), (holder, "lora_B"), (router, "weight")):
            old = getattr(owner, name)
            new = nn.Parameter(old.index_select(0, index).clone(), old.requires_grad)
            setattr(owner, name, new)
    router.out_features = len(keep)
    old_routing = layer.routing
    if len(keep) == 1 and isinstance(getattr(layer, "experts", None), nn.Module):
        layer.router = None  # layers with an experts module take one expert as a plain LoRA
    else:
        layer.routing = build_router(
            router_name(layer), len(keep), top_k, getattr(old_routing, "top_p", None)
        )
    for owner in {id(holder): holder, id(layer): layer}.values():
        if hasattr(owner, "num_experts"):
            owner.num_experts = len(keep)
