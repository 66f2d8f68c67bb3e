"""Routing load of every adapted module on given data, each module judged by its own router."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from mola.core.model import MolaModel


def measure_loads(model: MolaModel, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``{module name: (E,) float64 share of the selected assignments}``, padding excluded.

    Each module's logits go through that module's own router, so modules whose expert count was
    changed (by pruning) are counted right. The model runs in eval mode without gradients; every
    module's ``training`` flag is restored afterwards.

    Raises:
        ValueError: the model has no MoLA layers, or no batch was given.
    """
    layers = dict(model.mola_layers())
    if not layers:
        raise ValueError("the model has no MoLA layers")
    counts: dict[str, Tensor] = {}
    device = next(model.parameters()).device
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    seen = False
    try:
        with torch.inference_mode(), model.capture_router_logits() as store:
            for batch in batches:
                seen = True
                mask = batch.get("attention_mask")
                mask = None if mask is None else mask.to(device)
                store.clear()
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
                for entries in store.records.values():  # what each module selected
                    for name, routing in entries:
                        chosen = routing.mask
                        if mask is not None:
                            chosen = chosen & (mask.reshape(-1, 1) != 0)
                        total = chosen.sum(dim=0).double()
                        counts[name] = counts[name] + total if name in counts else total
                store.clear()
    finally:
        model.router_store.clear()
        for module, mode in modes:
            module.training = mode
    if not seen:
        raise ValueError("no data to measure the routing load on")
    loads = {}
    for name, total in counts.items():
        total = total.cpu()
        loads[name] = total / total.sum() if total.sum() > 0 else torch.zeros_like(total)
    return loads
