"""AdaMoLE: a learned per-token threshold on the router probabilities (Liu & Luo 2024).

"AdaMoLE: Fine-Tuning Large Language Models with Adaptive Mixture of Low-Rank Adaptation
Experts", COLM 2024, arXiv 2405.00361 (v1 followed), the authors' PEFT-based code (``AdaMoeLayer``).

``p = softmax(W x)``, a threshold ``tau = sigmoid(w_t x + b_t) * max_threshold`` per token
(``max_threshold`` defaults to ``1 / E``, so the most probable expert, with ``p >= 1/E > tau``,
is always used); the experts with ``p_i >= tau`` are used with gates ``(p_i - tau)``
renormalised to sum 1. The threshold row ``w_t`` is fused with the router rows; its bias ``b_t``
and ``w_t`` init as ``nn.Linear(d, 1)``.

``aux_loss`` is the authors' Switch-style balance: ``E * sum_i (n_i / N) * mean(p_i - tau)`` with
``n_i`` the tokens using expert ``i`` and the mean taken over all tokens (the shifted
probabilities, negative where unused, as in their code).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mola.routing.base import Router, Routing, renormalise
from mola.routing.registry import register


@register
class AdaMoLERouter(Router):
    """AdaMoLE's learned-threshold router."""

    name = "adamole"
    description = "experts whose probability exceeds a learned per-token threshold"
    paper = "Liu & Luo, AdaMoLE, COLM 2024, arXiv 2405.00361"
    dynamic = True
    option_names = ("max_threshold",)
    aux_loss_reduction = "module_sum"  # get_aux_loss: sum of every module's layer_loss

    def build(self, in_features: int, **kw: Any) -> None:
        self.threshold_weight = nn.Parameter(torch.empty(1, in_features, **kw))
        self.threshold_bias = nn.Parameter(torch.empty(1, **kw))
        with torch.no_grad():  # nn.Linear(d, 1)'s init
            nn.init.kaiming_uniform_(self.threshold_weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.threshold_bias, -bound, bound)

    @property
    def max_threshold(self) -> float:
        value = self.options.get("max_threshold")
        return 1.0 / self.num_experts if value is None else float(value)

    def fused_sources(self) -> tuple[Tensor, ...]:
        return (self.weight, self.threshold_weight)

    def fused_weight(self) -> Tensor:
        return torch.cat([self.weight, self.threshold_weight])

    def gate(self, z: Tensor, x: Tensor) -> Routing:
        e = self.num_experts
        logits = z[:, :e]
        probs = torch.softmax(logits.float(), dim=-1)
        tau = torch.sigmoid(z[:, e].float() + self.threshold_bias.float()) * self.max_threshold
        shifted = probs - tau.unsqueeze(-1)
        mask = shifted >= 0
        gates = renormalise(shifted * mask)
        return Routing(logits, gates, mask, {"threshold": tau, "shifted": shifted})

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("adamole routes with gate(): its threshold depends on x")

    def balance_terms(self, record: Routing) -> tuple[Tensor, Tensor]:
        """The tokens using each expert and the shifted probabilities ``p - tau``."""
        return record.mask, record.extras["shifted"]
