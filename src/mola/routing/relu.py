"""ReMoE-style ReLU routing with its L1 sparsity regulariser (Wang et al.).

"ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing", ICLR 2025, arXiv 2412.14711
(v2 followed); the baseline LD-MoLE compares with.

Gates ``g = ReLU(W x)`` (fp32, not normalised): an expert is used where its gate is positive,
so the number of experts per token varies and may be zero. As in the paper, a token with no
active expert is not forced onto one: its update is zero and the layer returns the frozen
output; the L1 term keeps the gates sparse, not the routing rule.

``l1_loss`` (weight ``l1_loss_coef``) is the paper's load-balanced L1:
``sum_e f_e * mean_t g_{t,e}`` with ``f_e = E / (k T) * #{t: g_{t,e} > 0}`` (detached; ``k``
= ``top_k``, the target number of active experts); without ``top_k`` it is the plain L1
``mean_t sum_e g_{t,e}``. Its weight adapts during training as in the paper (its adaptive L1
regularisation, :mod:`mola.routing.adaptive_l1`): ``l1_loss_coef`` is the starting weight, times
``l1_loss_alpha`` (1.2) after each step whose gates were denser than ``1 - k/E`` and divided by
it otherwise (``l1_loss_alpha: 1`` keeps it fixed; without ``top_k`` there is no target and the
weight stays fixed). There is no softmax load-balancing loss (``aux_loss`` is 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mola.routing.base import Router, Routing
from mola.routing.registry import register
from mola.utils.distributed import global_sums


@register
class ReLURouter(Router):
    """ReMoE's ReLU router."""

    name = "relu"
    description = "gates = ReLU(Rx), L1-regularised; zero or more experts per token"
    paper = "Wang et al., ReMoE, ICLR 2025, arXiv 2412.14711"
    uses_top_k = True  # the L1 balance's target k
    dynamic = True
    loss_names = ("l1_loss",)

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        gates = F.relu(logits.float())
        return gates, gates > 0

    def layer_losses(
        self,
        records: Sequence[Routing],
        attention_mask: Tensor | None = None,
        context: Mapping[str, Any] | None = None,
        global_batch: bool = False,
    ) -> dict[str, Tensor]:
        g = torch.cat([r.gates.reshape(-1, r.gates.shape[-1]) for r in records]).float()
        if attention_mask is not None:
            keep = attention_mask.reshape(-1).to(device=g.device, dtype=torch.float32)
            g = g * keep.repeat(len(records))[:, None]
            rows = keep.sum() * len(records)
        else:
            rows = torch.tensor(float(g.shape[0]), device=g.device)
        gate_sum, active = g.sum(dim=0), (g > 0).float().sum(dim=0)
        if global_batch:  # sums over the global batch (see load_balancing_loss)
            gate_sum, plain = global_sums(gate_sum, torch.cat([active, rows.reshape(1)]))
            active, rows = plain[:-1], plain[-1]
        rows = rows.clamp_min(1)
        mean_gate = gate_sum / rows
        zero = g.new_zeros(())
        if self.top_k is None:
            return {"l1_loss": mean_gate.sum(), "aux_loss": zero}
        f = self.num_experts / self.top_k * (active / rows)
        return {"l1_loss": (f.detach() * mean_gate).sum(), "aux_loss": zero}
