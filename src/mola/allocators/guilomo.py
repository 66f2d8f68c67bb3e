"""GuiLoMo: choose each layer's expert number and rank with GuidedSelection Vectors (GSVs).

Followed: Zhang, Chen et al., "GuiLoMo: Allocating Expert Number and Rank for LoRA-MoE via Bilevel
Optimization with GuidedSelection Vectors", arXiv 2506.14646 (v2; EMNLP 2025 Findings), and the
authors' code, Liar406/Gui-LoMo (``ArMoLA/src/mola_lora_hacked.py``: the GSVs and their
backward; ``ArMoLA/src/mola_trainer_hacked.py``: ``architect_step``, the bilevel loop;
``ArMoLA/mola_training.py`` and ``run_train.sh``: the settings; ``save_rankandexp_num.py``: the
read-off), read for the method, not copied.

As the authors' code (the default, ``estimator="authors"``; see :mod:`mola.allocators.gsv`):

* one expert GSV per adapted module (per decoder layer *and* module type) and one rank GSV per
  expert; sigmoid scores, hard argmax masks whose backward updates only the chosen entry, random
  (``randn``) initialisation, the expert-count gradient through a bias on the router logits, a
  trainable per-rank scale on each expert;
* bilevel optimisation over the training data in pairs of consecutive batches: the first of a
  pair trains the experts and routers (lower level), the second the GSVs (upper level), GSV
  step first as in DARTS; the GSVs' optimiser is AdamW with lr 3e-3, betas (0.5, 0.999) and
  no weight decay (``arch_learning_rate=3e-3``; their ``create_optimizer_arch`` takes the
  Trainer's weight decay, 0 by default); the length is counted in epochs (4 in
  ``run_train.sh``);
* read-off per module: ``max(min_experts, argmax + 1)`` experts, ``argmax + 1`` ranks per
  expert (:attr:`GSVReadout.modules`).

Deliberate differences (docs/methods.md):

* first-order bilevel approximation (DARTS with xi = 0): the code's second-order finite
  difference costs three more forward/backward passes per step;
* the experts' optimiser is the probe's AdamW (``--lr``), not the Trainer's schedule;
* mola trains one expert number and one rank per decoder layer, so the per-module read-offs
  are averaged per layer into the layer's weights, scaled to the budget by
  :mod:`mola.allocators.budget` (the paper reads off the numbers without a budget); the
  per-module counts and per-expert ranks are reported beside the allocation;
* ``estimator="gumbel"`` keeps mola's earlier straight-through Gumbel-softmax search.
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
    modules: dict[str, dict[str, object]] = field(default_factory=dict)
    all_ranks: dict[str, list[int]] = field(default_factory=dict)  # every expert's, per module


def read_gsvs(layers: list[GSVLinear]) -> GSVReadout:
    """Average each layer's modules' GSV read-offs into one expert number and rank per layer."""
    per_layer: dict[int, list[GSVLinear]] = {}
    for layer in layers:
        per_layer.setdefault(-1 if layer.layer_idx is None else layer.layer_idx, []).append(layer)
    experts, ranks, exp_e, exp_r = [], [], [], []
    modules: dict[str, dict[str, object]] = {}
    all_ranks: dict[str, list[int]] = {}
    with torch.no_grad():
        for layer in layers:
            k, rank_list = layer.chosen()
            modules[layer.module_name] = {"experts": k, "ranks": rank_list[:k]}
            all_ranks[layer.module_name] = rank_list
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
    return GSVReadout(experts, ranks, exp_e, exp_r, modules=modules, all_ranks=all_ranks)


def search(
    model: MolaModel,
    train: Iterator[Batch],
    heldout: Iterator[Batch],
    steps: int,
    *,
    lr: float = 2e-3,
    gsv_lr: float = 3e-3,
    gsv_weight_decay: float = 0.0,
    gsv_betas: tuple[float, float] = (0.5, 0.999),
    tau: float = 1.0,
    estimator: str = "authors",
    progress: bool = False,
) -> GSVReadout:
    """Run GuiLoMo's bilevel search on ``model`` (a uniform probe at the largest candidate shape).

    Every ``MolaLinear`` becomes a :class:`~mola.allocators.gsv.GSVLinear` (fresh weights). Each
    step: one AdamW step of the GSVs on a ``heldout`` batch, then one AdamW step of the experts
    and routers on a ``train`` batch (the authors take the two from consecutive batches of the
    training data: :func:`paired_batches`).

    Returns:
        The per-layer read-off (:class:`GSVReadout`).
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"--probe-steps: must be >= 1, got {steps}")
    start = time.perf_counter()
    layers = attach_gsvs(model.base_model, tau=tau, estimator=estimator)
    if not layers:
        raise ValueError("the model has no MoLA layers to allocate")
    gsvs = [p for n, p in model.named_parameters() if "lora_gsv_" in n]
    weights = [p for n, p in model.named_parameters() if p.requires_grad and "lora_gsv_" not in n]
    opt_w = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
    opt_g = torch.optim.AdamW(gsvs, lr=gsv_lr, betas=gsv_betas, weight_decay=gsv_weight_decay)
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


def paired_batches(batches: list, epochs: float, seed: int) -> tuple[Iterator, Iterator, int]:
    """The authors' bilevel stream: each epoch (shuffled by ``seed`` + epoch) split into pairs
    of consecutive batches, the first for the weights, the second for the GSVs (the last batch
    of an odd count pairs with itself, as their ``inputs_train.copy()``).

    Returns ``(train, heldout, steps)`` with ``steps`` = pairs per epoch x ``epochs`` (>= 1).
    """
    per_epoch = max(1, (len(batches) + 1) // 2)
    steps = max(1, round(per_epoch * epochs))
    pairs: list[tuple] = []
    epoch = 0
    while len(pairs) < steps:
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + epoch))
        chosen = [batches[int(i)] for i in order]
        for i in range(0, len(chosen), 2):
            pairs.append((chosen[i], chosen[i + 1] if i + 1 < len(chosen) else chosen[i]))
        epoch += 1
    pairs = pairs[:steps]
    return iter([p[0] for p in pairs]), iter([p[1] for p in pairs]), steps
