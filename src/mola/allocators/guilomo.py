"""GuiLoMo: choose each layer's expert number and rank with GuidedSelection Vectors (GSVs).

Followed: Zhang, Chen et al., "GuiLoMo: Allocating Expert Number and Rank for LoRA-MoE via Bilevel
Optimization with GuidedSelection Vectors", arXiv 2506.14646 (v2; EMNLP 2025 Findings), and the
authors' code, github.com/Liar406/Gui-LoMo at commit f6305dc (``ArMoLA/``: the search;
``save_rankandexp_num.py``: the read-off), read for the method, not copied. Only the paper's
abstract (v1 and v2 agree) was readable from here, not its method section, so where the two could
differ the details below follow the code.

What is as in the paper / code:

* one expert GSV per adapted module (per decoder layer *and* module type) over the candidate
  expert numbers, and one rank GSV per expert over the candidate ranks ``1..R_max``; choosing
  ``k`` keeps the first ``k`` experts routable (the others' router logits get -1e4) and choosing
  ``q`` keeps an expert's first ``q`` rank components (see :mod:`mola.allocators.gsv`);
* bilevel optimisation: the experts and routers (lower level) are trained on a training split,
  the GSVs (upper level) on a held-out split of the *training* data, alternating one batch each,
  GSV step first as in DARTS; AdamW on the GSVs with weight decay 1e-3 as in the code;
* read-off: ``argmax`` of each GSV (+ the smallest candidate), as ``save_rankandexp_num.py``.

Choices the paper leaves open or that mola makes differently (each recorded here):

* gradient estimator: a straight-through Gumbel-softmax over the candidates (hard prefix mask
  forward, relaxed mask backward, temperature 1). The authors' code uses a custom backward that
  only updates the argmax entry; the straight-through form gives every candidate a gradient;
* first-order bilevel approximation (DARTS with xi = 0): the code's second-order finite
  difference costs three more forward/backward passes per step, too slow on CPU;
* GSVs start uniform (zeros), so a layer with no evidence reads off the smallest candidate;
* the smallest expert candidate is ``max(1, top_k)`` (the code forces >= 2 for its top-2);
* mola has one expert number and one rank per decoder layer, so the read-offs are averaged over
  the layer's modules (and, for ranks, over its selected experts); those averages are the
  layer's weights, scaled to the budget by :mod:`mola.allocators.budget` (the paper reads off
  the numbers without a budget);
* the GSV learning rate is high (0.1 by default, the code's is 3e-3) because a CPU probe runs tens
  of steps, not epochs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mola.allocators.gsv import GSVLinear, attach_gsvs
from mola.allocators.probe import Batch, step
from mola.core.model import MolaModel


@dataclass
class GSVReadout:
    """Per decoder layer: the GSV read-off averaged over the layer's modules.

    Attributes:
        experts: mean ``argmax`` expert number of the layer's modules.
        ranks: mean ``argmax`` rank of the selected experts of the layer's modules.
        expected_experts / expected_ranks: the same under ``softmax(GSV)`` (for inspection).
        history: held-out loss after each upper-level step.
    """

    experts: list[float]
    ranks: list[float]
    expected_experts: list[float]
    expected_ranks: list[float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def read_gsvs(layers: list[GSVLinear]) -> GSVReadout:
    """Average each layer's modules' GSV read-offs into one expert number and rank per layer."""
    per_layer: dict[int, list[GSVLinear]] = {}
    for layer in layers:
        per_layer.setdefault(-1 if layer.layer_idx is None else layer.layer_idx, []).append(layer)
    experts, ranks, exp_e, exp_r = [], [], [], []
    for idx in sorted(per_layer):
        mods = per_layer[idx]
        e_hat, r_hat, ee, rr = [], [], [], []
        with torch.no_grad():
            for mod in mods:
                k, rank_list = mod.chosen()
                e_soft, r_soft = mod.expected()
                e_hat.append(k)
                r_hat.extend(rank_list[:k])
                ee.append(e_soft)
                rr.extend(r_soft[:k])
        experts.append(sum(e_hat) / len(e_hat))
        ranks.append(sum(r_hat) / len(r_hat))
        exp_e.append(sum(ee) / len(ee))
        exp_r.append(sum(rr) / len(rr))
    return GSVReadout(experts, ranks, exp_e, exp_r)


def search(
    model: MolaModel,
    train: Iterator[Batch],
    heldout: Iterator[Batch],
    steps: int,
    *,
    lr: float = 2e-3,
    gsv_lr: float = 0.1,
    gsv_weight_decay: float = 1e-3,
    tau: float = 1.0,
    progress: bool = False,
) -> GSVReadout:
    """Run GuiLoMo's bilevel search on ``model`` (a uniform probe at the largest candidate shape).

    Every ``MolaLinear`` becomes a :class:`~mola.allocators.gsv.GSVLinear` (fresh weights). Each
    step: one AdamW step of the GSVs on a ``heldout`` batch, then one AdamW step of the experts
    and routers on a ``train`` batch.

    Returns:
        The per-layer read-off (:class:`GSVReadout`).
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"--probe-steps: must be >= 1, got {steps}")
    start = time.perf_counter()
    layers = attach_gsvs(model.base_model, tau=tau)
    if not layers:
        raise ValueError("the model has no MoLA layers to allocate")
    gsvs = [p for n, p in model.named_parameters() if "lora_gsv_" in n]
    weights = [p for n, p in model.named_parameters() if p.requires_grad and "lora_gsv_" not in n]
    opt_w = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
    opt_g = torch.optim.AdamW(gsvs, lr=gsv_lr, weight_decay=gsv_weight_decay)
    history: list[dict[str, float]] = []
    model.train()
    bar = tqdm(range(steps), desc="guilomo", unit="step", disable=not progress)
    for i in bar:
        heldout_loss = step(model, next(heldout), [opt_g])  # upper level: GSVs, held-out split
        train_loss = step(model, next(train), [opt_w])  # lower level: experts + routers
        history.append({"step": i + 1, "train_loss": train_loss, "heldout_loss": heldout_loss})
        bar.set_postfix(train=f"{train_loss:.3f}", heldout=f"{heldout_loss:.3f}")
    model.eval()
    readout = read_gsvs(layers)
    readout.history = history
    readout.seconds = time.perf_counter() - start
    return readout
