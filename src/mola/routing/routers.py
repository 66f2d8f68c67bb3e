"""Routers (which experts each token uses, with which weight) and the auxiliary router losses.

Every router reads router logits ``z`` of shape ``(N, E)`` and returns dense gates ``g`` of the same
shape, zero for the experts a token does not use, together with the boolean selection mask. The
probabilities ``p = softmax(z)`` are always taken in fp32.

======== ================================================================================
name     rule
======== ================================================================================
topk     MoLA: keep the ``top_k`` largest ``p``, renormalise them to sum 1
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


class Router:
    """Base class: ``route(logits) -> (gates, mask)``; subclasses implement ``select``."""

    name = "base"
    uses_top_k = False

    def __init__(self, num_experts: int, top_k: int | None = None, top_p: float | None = None):
        self.num_experts = num_experts
        self.top_k = top_k
        self.top_p = top_p

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(gates, mask)`` from fp32 probabilities of shape ``(N, E)``."""
        raise NotImplementedError

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Gates (fp32, ``(N, E)``, zero where unused) and boolean selection mask."""
        return self.select(torch.softmax(logits.float(), dim=-1))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_experts={self.num_experts}, top_k={self.top_k})"


def _keep(probs: Tensor, mask: Tensor, renormalise: bool) -> Tensor:
    gates = probs * mask
    if renormalise:
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
    return gates


class TopKRouter(Router):
    """MoLA's router: the top-k experts, their probabilities renormalised to sum 1."""

    name = "topk"
    uses_top_k = True

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        k = self.top_k or 1
        idx = probs.topk(k, dim=-1).indices
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, True)
        return _keep(probs, mask, renormalise=True), mask


class SwitchRouter(Router):
    """Switch routing: the single most probable expert, gated by its (unrenormalised) p."""

    name = "switch"

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        idx = probs.argmax(dim=-1, keepdim=True)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, True)
        return _keep(probs, mask, renormalise=False), mask


class TopPRouter(Router):
    """Dynamic routing: the fewest experts whose cumulative probability reaches ``top_p``."""

    name = "topp"
    uses_top_k = True

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the experts ranked above
        keep_sorted = before < self.top_p
        keep_sorted[..., 0] = True
        if self.top_k is not None:
            keep_sorted[..., self.top_k :] = False
        mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        return _keep(probs, mask, renormalise=True), mask


class SoftRouter(Router):
    """Soft mixture: every expert, weighted by its probability."""

    name = "soft"

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        return probs, torch.ones_like(probs, dtype=torch.bool)


ROUTERS: dict[str, type[Router]] = {
    cls.name: cls for cls in (TopKRouter, SwitchRouter, TopPRouter, SoftRouter)
}


def build_router(
    name: str, num_experts: int, top_k: int | None = None, top_p: float | None = None
) -> Router:
    """Make the router called ``name`` for a layer with ``num_experts`` experts.

    Raises:
        ValueError: unknown router name, or a ``top_k``/``top_p`` it cannot use.
    """
    if name not in ROUTERS:
        raise ValueError(f"router: unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    cls = ROUTERS[name]
    if num_experts < 1:
        raise ValueError(f"num_experts: must be >= 1, got {num_experts}")
    if cls.uses_top_k and top_k is not None and not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k: {top_k} is not in 1..{num_experts} for a layer with {num_experts} experts; "
            f"lower top_k or raise num_experts"
        )
    if name == "topk" and top_k is None:
        raise ValueError("top_k: the 'topk' router needs top_k (e.g. 2)")
    if name == "topp" and (top_p is None or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: the 'topp' router needs 0 < top_p <= 1, got {top_p}")
    return cls(num_experts, top_k if cls.uses_top_k else None, top_p)
