"""The softmax routers: a rule on ``p = softmax(z)`` (fp32), no parameters beyond the logits.

======== ================================================================================
name     rule
======== ================================================================================
topk     MoLA: keep the ``top_k`` largest ``p``, renormalise them to sum 1 (computed as the
         softmax of the ``top_k`` largest logits, which is the same function)
switch   top-1, gate = its probability (not renormalised), as in the Switch Transformer
topp     per token, the fewest experts whose cumulative ``p`` reaches ``top_p`` (at least 1,
         at most ``top_k`` when given), renormalised: a dynamic number of experts per token
soft     every expert, weighted by ``p``
======== ================================================================================

All of it is tensor code without host syncs, so it is safe on the hot path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mola.routing.base import Router, Routing, index_mask, keep, topk_gates, topk_mask
from mola.routing.registry import register


@register
class TopKRouter(Router):
    """MoLA's router: the top-k experts, their probabilities renormalised to sum 1."""

    name = "topk"
    description = "top-k of softmax(Rx), renormalised (MoLA)"
    paper = "Gao et al. 2024, Higher Layers Need More LoRA Experts, arXiv 2402.08562"
    uses_top_k = True
    requires_top_k = True

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        mask = topk_mask(probs, self.top_k or 1)
        return keep(probs, mask, renorm=True), mask

    def gate(self, z: Tensor, x: Tensor) -> Routing:
        """The fused gate (:func:`~mola.routing.base.topk_gates`); the mask is built lazily."""
        logits = z if z.shape[-1] == self.num_experts else z[:, : self.num_experts]
        gates, indices = topk_gates(logits, self.top_k or 1)
        return Routing(logits, gates, indices=indices)

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        gates, indices = topk_gates(logits, self.top_k or 1)
        return gates, index_mask(indices, logits.shape[-1])


@register
class SwitchRouter(Router):
    """Switch routing: the single most probable expert, gated by its (unrenormalised) p."""

    name = "switch"
    description = "top-1, gate = its probability (Switch Transformer)"
    paper = "Fedus et al. 2021, Switch Transformers, arXiv 2101.03961"

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        mask = topk_mask(probs, 1)
        return keep(probs, mask, renorm=False), mask


@register
class TopPRouter(Router):
    """Dynamic routing: the fewest experts whose cumulative probability reaches ``top_p``."""

    name = "topp"
    description = "fewest experts whose cumulative probability reaches top_p (cap top_k)"
    paper = "Huang et al. 2024, Harder Tasks Need More Experts, arXiv 2403.07652"
    uses_top_k = True
    dynamic = True
    default_top_p = 0.5

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the experts ranked above
        keep_sorted = before < self.top_p
        keep_sorted[..., 0] = True
        if self.top_k is not None:
            keep_sorted[..., self.top_k :] = False
        mask = keep_sorted.new_zeros(keep_sorted.shape).scatter_(-1, order, keep_sorted)
        return keep(probs, mask, renorm=True), mask


@register
class SoftRouter(Router):
    """Soft mixture: every expert, weighted by its probability."""

    name = "soft"
    description = "every expert, weighted by softmax(Rx)"
    paper = "dense mixture (LoRAMoE, X-LoRA style)"

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        return probs, probs.new_ones(probs.shape, dtype=torch.bool)
