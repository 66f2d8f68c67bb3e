"""ReMoE's adaptive L1 coefficient: a zeroth-order controller on the routers' sparsity.

ReMoE (Wang et al., ICLR 2025, arXiv 2412.14711, "adaptive L1 regularization"; the authors' code,
thu-ml/ReMoE ``megatron/training/training.py`` and ``moe/router.py``) does not fix the weight
``lambda`` of its L1 term: after every optimizer step ``i`` it measures the sparsity ``S_i`` of
the ReLU gates (the share of zero gates) in that step's training forwards and sets

    ``lambda_{i+1} = lambda_i * alpha``  if ``S_i < 1 - k / E`` (too dense),
    ``lambda_{i+1} = lambda_i / alpha``  otherwise,

with ``alpha = 1.2`` and ``lambda_0 = 1e-8`` (the code's ``--moe-relu-l1-reg-coeff-init`` and
``-multiplier`` defaults). The code measures ``S_i`` per layer (zero gates / gates), averages it
over layers, micro-batches and data-parallel ranks, and divides when ``S_i`` equals the target.

In mola ``lambda`` is ``l1_loss_coef`` (its start value) and ``alpha`` is ``l1_loss_alpha``
(1.2 as the paper; 1 keeps the weight fixed). Open choices, taken here:

* a decoder layer's sparsity counts the gates of all its ReLU-routed modules (each module has its
  own router in mola, ReMoE has one per layer); padding tokens are left out;
* the zero and gate counts are summed over the step's micro-batches and all processes before
  the per-layer ratio, so N processes with batch b update exactly like one with batch N*b;
* mola allocates experts per layer, so the target is the mean over layers of ``1 - k_l / E_l``
  (ReMoE's single ``1 - k / E`` when every layer is alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mola.routing.base import Routing
from mola.utils.distributed import all_reduce_sum


def next_coef(coef: float, sparsity: float, target: float, alpha: float) -> float:
    """ReMoE's update: ``coef * alpha`` when ``sparsity < target``, else ``coef / alpha``."""
    return coef * alpha if sparsity < target else coef / alpha


class AdaptiveL1:
    """The current L1 weight, the step's sparsity counts and the update between steps.

    Args:
        coef: the starting weight (``l1_loss_coef``).
        alpha: the multiplier (``l1_loss_alpha``).
    """

    STATE_KEY = "mola_adaptive_l1"  # its entry in the Trainer's checkpointed state

    def __init__(self, coef: float, alpha: float) -> None:
        self.coef = float(coef)  # the weight of the next step
        self.alpha = float(alpha)
        self.applied = self.coef  # the weight of the last finished step
        self.sparsity: float | None = None  # measured in the last finished step
        self.target: float | None = None
        self._counts: dict[int, Tensor] = {}

    def observe(
        self,
        layer: int,
        records: Sequence[Routing],
        num_experts: int,
        top_k: int,
        attention_mask: Tensor | None = None,
    ) -> None:
        """Count one forward's zero gates of decoder layer ``layer`` (no host sync)."""
        mask = torch.cat([r.mask.reshape(-1, r.mask.shape[-1]) for r in records])
        if attention_mask is not None:
            keep = attention_mask.reshape(-1).to(device=mask.device, dtype=torch.bool)
            keep = keep.repeat(len(records))
            rows = keep.sum()
            active = (mask & keep[:, None]).sum()
        else:
            rows = torch.tensor(mask.shape[0], device=mask.device)
            active = mask.sum()
        slots = rows * num_experts
        counts = torch.stack([slots - active, slots, rows * top_k]).double()
        self._counts[layer] = self._counts.get(layer, 0) + counts

    def step(self) -> None:
        """After an optimizer step: the step's sparsity (over all processes), then the update.

        A collective under data parallelism: every process calls it after each step.
        """
        if not self._counts:
            return
        stats = all_reduce_sum(torch.stack([self._counts[k] for k in sorted(self._counts)]))
        self._counts.clear()
        zeros, slots, allowed = stats.unbind(-1)
        slots = slots.clamp_min(1)
        self.sparsity = float((zeros / slots).mean())
        self.target = float((1 - allowed / slots).mean())
        self.applied = self.coef
        self.coef = next_coef(self.coef, self.sparsity, self.target, self.alpha)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (between steps the counts are empty)."""
        return {
            "coef": self.coef,
            "alpha": self.alpha,
            "applied": self.applied,
            "sparsity": self.sparsity,
            "target": self.target,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])
        self.applied = float(state.get("applied", self.coef))
        self.sparsity = state.get("sparsity")
        self.target = state.get("target")
        self._counts.clear()
