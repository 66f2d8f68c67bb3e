"""DynMoLE: hybrid routing driven by the Tsallis entropy of the router (Li et al. 2025).

"DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid Routing Mechanism",
arXiv 2504.00661 (v1 followed), authors' code mikecovlee/DynMoLE
(``moe_peft/adapters/dynmole/model.py``, ``moe_peft/common/moe_utils.py``).

With ``p = softmax(W x)`` and the normalised Tsallis entropy
``S_q(p) = (1 - sum_i (p_i + eps)^q) / (q - 1) / ((1 - E^(1-q)) / (q - 1))`` (``q`` =
``entropy_index`` 1.1, ``eps`` 1e-5):

* a token whose entropy exceeds ``entropy_threshold`` (0.9), an uncertain router, uses every
  expert;
* otherwise top-p: the experts (by decreasing ``p``) whose cumulative probability stays
  ``<= top_p`` (0.75), and at least the ``top_k`` (``keep_top_k``, 2) most probable ones.

The gate of a used expert is its probability ``p_i``, **not renormalised** (as the authors'
code). Losses, per decoder layer: ``aux_loss``, the authors' balance ``E * sum_i f_i P_i`` with
``f_i`` the mean *gate* of expert ``i`` and ``P_i`` its mean probability; ``entropy_loss``, the
mean normalised Tsallis entropy (weight ``entropy_loss_coef``, 0.01 in the paper's setting), which
pushes the router to be confident. With one expert the entropy is 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mola.routing.base import Router, Routing, keep
from mola.routing.losses import masked_mean
from mola.routing.registry import register


def tsallis_entropy(probs: Tensor, q: float, eps: float = 1e-5) -> Tensor:
    """Normalised Tsallis entropy per row (1 ~ uniform), as the authors compute it."""
    n = probs.shape[-1]
    p = probs.float() + eps
    if n == 1:
        return torch.zeros_like(p[..., 0])
    if q == 1.0:
        return -(p * p.log()).sum(dim=-1) / torch.log(torch.tensor(float(n)))
    return (1.0 - (p**q).sum(dim=-1)) / (1.0 - n ** (1.0 - q))


@register
class DynMoLERouter(Router):
    """DynMoLE's entropy-switched hybrid of top-p/top-k and dense routing."""

    name = "dynmole"
    description = "top-p (at least top_k), all experts when the Tsallis entropy is high"
    paper = "Li et al. 2025, DynMoLE, arXiv 2504.00661"
    uses_top_k = True
    dynamic = True
    option_names = ("entropy_threshold", "entropy_index", "entropy_eps")
    loss_names = ("aux_loss", "entropy_loss")
    default_top_p = 0.75  # DynMoleConfig: config.get("top_p", 0.75)
    aux_loss_reduction = "global"  # one loss over every layer's router logits concatenated

    def _settings(self) -> tuple[float, float, float]:
        o = self.options
        return (
            float(o.get("entropy_threshold", 0.9)),
            float(o.get("entropy_index", 1.1)),
            float(o.get("entropy_eps", 1e-5)),
        )

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        threshold, q, eps = self._settings()
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep_sorted = sorted_p.cumsum(dim=-1) <= (1.0 if self.top_p is None else self.top_p)
        keep_sorted[..., : self.top_k or 1] = True
        mask = keep_sorted.new_zeros(keep_sorted.shape).scatter_(-1, order, keep_sorted)
        mask = mask | (tsallis_entropy(probs, q, eps) > threshold).unsqueeze(-1)
        return keep(probs, mask, renorm=False), mask

    def gate(self, z: Tensor, x: Tensor) -> Routing:
        logits = z[:, : self.num_experts]
        probs = torch.softmax(logits.float(), dim=-1)
        gates, mask = self.select(probs)
        _, q, eps = self._settings()
        return Routing(logits, gates, mask, {"entropy": tsallis_entropy(probs, q, eps)})

    balance_count = False  # f_i: the mean gate of expert i

    def balance_terms(self, record: Routing) -> tuple[Tensor, Tensor]:
        """The gates (``f_i`` their mean) and the probabilities (``P_i``)."""
        return record.gates, torch.softmax(record.logits.float(), dim=-1)

    def layer_losses(
        self,
        records: Sequence[Routing],
        attention_mask: Tensor | None = None,
        context: Mapping[str, Any] | None = None,
        global_batch: bool = False,
    ) -> dict[str, Tensor]:
        entropy = torch.cat([r.extras["entropy"] for r in records])
        return {
            "aux_loss": self.balance_loss(records, attention_mask, global_batch),
            "entropy_loss": masked_mean(entropy, attention_mask, len(records), global_batch),
        }
