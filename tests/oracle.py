"""The reference: MoLA written token by token, expert by expert, straight from the formula.

    y = W x + sum_{e selected} g_e * (alpha / r) * B_e A_e x

Deliberately slow and plain; the fast path in ``mola.layer`` must match it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mola.core.layer import MolaLinear


def oracle_gates(probs: list[float], router: str, top_k: int | None, top_p: float | None):
    """``[(expert, gate), ...]`` for one token's probabilities, by the router's written rule."""
    order = sorted(range(len(probs)), key=lambda e: -probs[e])
    if router == "soft":
        return [(e, probs[e]) for e in range(len(probs))]
    if router == "switch":
        return [(order[0], probs[order[0]])]
    if router == "topk":
        chosen = order[:top_k]
    elif router == "topp":
        chosen, mass = [], 0.0
        for e in order:
            chosen.append(e)
            mass += probs[e]
            if mass >= top_p or (top_k is not None and len(chosen) == top_k):
                break
    else:
        raise ValueError(router)
    total = sum(probs[e] for e in chosen)
    return [(e, probs[e] / total) for e in chosen]


def oracle_forward(
    layer: MolaLinear, x: Tensor, router: str, top_k: int | None, top_p: float | None = None
) -> Tensor:
    """MoLA forward computed per token and per selected expert (dropout off)."""
    base = layer.base_layer(x)
    flat = x.reshape(-1, layer.in_features)
    if layer.router is None:  # one expert, no router: gate 1
        probs = torch.ones(flat.shape[0], 1)
    else:
        probs = torch.softmax(layer.router(flat.to(layer.router.weight.dtype)).float(), dim=-1)
    rows = []
    for n in range(flat.shape[0]):
        p_values = probs[n].tolist()
        delta = torch.zeros(layer.out_features, dtype=torch.float32)
        for e, _ in oracle_gates(p_values, router, top_k, top_p):
            gate = probs[n, e]
            if router in ("topk", "topp"):
                chosen = [c for c, _ in oracle_gates(p_values, router, top_k, top_p)]
                gate = probs[n, e] / probs[n, chosen].sum()
            a_e, b_e = layer.lora_A[e].float(), layer.lora_B[e].float()
            delta = delta + gate * layer.scaling * (b_e @ (a_e @ flat[n].float()))
        rows.append(delta)
    return base + torch.stack(rows).view(*x.shape[:-1], -1).to(base.dtype)
