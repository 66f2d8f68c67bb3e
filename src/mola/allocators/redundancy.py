"""The cheap baseline: give more experts to the layers whose experts differ most.

MoLA's own evidence ("Higher Layers Need More LoRA Experts", section on expert redundancy): after
training with a uniform allocation, the experts of lower layers stay alike (small mean pairwise
distance ``||dW_i - dW_j||_F``) and those of higher layers grow apart. This strategy trains a
short probe with the same number of experts everywhere, measures each layer's expert redundancy
(:func:`mola.analysis.redundancy_stats`, averaged over the layer's modules) and its routing
entropy on held-out batches (:func:`mola.analysis.collect_routing`), and uses the redundancy
(the distance: larger = experts differ more) as the layer's weight for the expert budget. The
entropy is reported beside it, not used: a near-uniform router says little about whether more
experts would help. Ranks stay the probe's rank (shaped uniformly under a parameter budget).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mola.allocators.probe import Batch, step
from mola.analysis.collect import collect_routing
from mola.analysis.redundancy import redundancy_stats
from mola.core.model import MolaModel


@dataclass
class RedundancyReadout:
    """Per decoder layer: mean pairwise expert distance and normalised routing entropy."""

    redundancy: list[float]
    entropy: list[float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else 0.0


def measure(
    model: MolaModel,
    train: Iterator[Batch],
    heldout: Sequence[Batch],
    steps: int,
    *,
    lr: float = 2e-3,
    progress: bool = False,
) -> RedundancyReadout:
    """Train ``model`` (a uniform probe) for ``steps`` batches, then read redundancy and entropy.

    Raises:
        ValueError: ``steps`` < 1, or the probe has fewer than 2 experts (no redundancy).
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"--probe-steps: must be >= 1, got {steps}")
    if any(e < 2 for e in model.allocation["num_experts"]):
        raise ValueError("--max-experts: the redundancy probe needs at least 2 experts per layer")
    start = time.perf_counter()
    weights = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
    history: list[dict[str, float]] = []
    model.train()
    for i in tqdm(range(steps), desc="redundancy probe", unit="step", disable=not progress):
        history.append({"step": i + 1, "train_loss": step(model, next(train), [opt])})
    model.eval()
    per_module = redundancy_stats(model)
    layers = sorted({idx for idx, _ in per_module})
    redundancy = [
        _mean([red.redundancy for (i, _), red in per_module.items() if i == idx]) for idx in layers
    ]
    routing = collect_routing(model, heldout)
    seen = set(routing.layers())
    entropy = [routing.layer(i).normalised_entropy if i in seen else math.nan for i in layers]
    return RedundancyReadout(redundancy, entropy, history, time.perf_counter() - start)
