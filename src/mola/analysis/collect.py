"""Running an adapted model over data to collect its routing statistics.

:func:`encode_batches` tokenises examples into padded batches and :func:`collect_routing` runs
the model over them (no gradients, eval mode) into a :class:`~mola.analysis.routing.RoutingStats`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mola.analysis.routing import RoutingStats
from mola.core.model import module_keys
from mola.routing import Router

if TYPE_CHECKING:
    from mola.core.model import MolaModel
    from mola.data.datasets import Example


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
