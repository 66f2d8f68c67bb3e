"""What both strategies share: the probe model, its batches, a plain training step, layer costs."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from mola.allocators.budget import LayerCost
from mola.core.config import MolaConfig
from mola.core.model import MolaModel, get_mola_model

Batch = dict[str, Tensor]


def layer_costs(model: MolaModel) -> list[LayerCost]:
    """Per decoder layer, the parameter cost of one expert (see :class:`LayerCost`).

    Read from the adapted modules of ``model`` (any allocation: only their sizes matter).
    """
    unit: dict[int, int] = {}
    router: dict[int, int] = {}
    for _, layer in model.mola_layers():
        idx = -1 if layer.layer_idx is None else layer.layer_idx
        unit[idx] = unit.get(idx, 0) + layer.in_features + layer.out_features
        router[idx] = router.get(idx, 0) + layer.in_features
    return [LayerCost(unit[i], router[i]) for i in sorted(unit)]


def probe_model(base: torch.nn.Module, config: MolaConfig, num_experts: int, r: int) -> MolaModel:
    """``base`` with every layer given ``num_experts`` experts of rank ``r`` (uniform probe).

    The probe always uses stacked experts and no per-module overrides: the allocation it finds
    is per decoder layer.
    """
    settings = {**config.to_dict(), "num_experts": num_experts, "r": r}
    settings.update(experts_structure="stacked", module_patterns={})
    probe = MolaConfig(**settings)
    model = get_mola_model(base, probe)
    model.logits_only_where_labelled = True
    return model


def cycle(batches: Sequence[Batch], seed: int) -> Iterator[Batch]:
    """Endless reshuffled passes over ``batches``."""
    if not batches:
        raise ValueError("no batches to probe on")
    rng = random.Random(seed)
    order = list(range(len(batches)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield batches[i]


def collate_rows(rows: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int) -> list[Batch]:
    """Pad encoded rows (``input_ids``, ``attention_mask``, ``labels``) into batches."""
    from mola.data.prompts import DataCollator

    collate = DataCollator(pad_id)
    return [collate(list(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]


def step(model: MolaModel, batch: Batch, optimizers: Sequence[torch.optim.Optimizer]) -> float:
    """One forward/backward on ``batch``; only ``optimizers`` step. Returns the loss."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    out.loss.backward()
    for opt in optimizers:
        opt.step()
    for param in model.parameters():  # the other level's gradients are not kept
        param.grad = None
    return float(out.loss.detach())


def encode_examples(
    tokenizer: Any, examples: Sequence[Any], template: str, cutoff_len: int, train_on_inputs: bool
) -> list[dict[str, list[int]]]:
    from mola.data.prompts import encode_for_training

    return [
        encode_for_training(tokenizer, e, template, cutoff_len, train_on_inputs) for e in examples
    ]
