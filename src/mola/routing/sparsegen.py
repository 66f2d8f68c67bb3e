"""LD-MoLE: sparsegen routing with a token-dependent sparsity ``lambda`` (Zhuang et al.).

"LD-MoLE: Learnable Dynamic Routing for Mixture of LoRA Experts", ICLR 2026, arXiv 2509.25684
(v2 followed), authors' code eshentw/LD-MoLE (``peft/utils/sparsegen.py``, ``loss/loss.py``).

For router logits ``u = W x`` and ``lambda < 1`` the gates solve
``p = argmin_p ||p - u||^2 - lambda ||p||^2`` on the simplex; the closed form is sparsemax of
``u / (1 - lambda)``: with ``u`` sorted decreasingly, ``k(u)`` the largest ``k`` such that
``1 - lambda + k u_(k) > sum_{j<=k} u_(j)``, ``tau = (sum_{j<=k(u)} u_(j) - 1 + lambda) / k(u)``
and ``p_i = max(u_i - tau, 0) / (1 - lambda)``. The top expert always stays (``k(u) >= 1``), the
number of experts varies per token and per layer.

``lambda = logsigmoid(MLP(x)) + 1 - eps`` (so ``lambda < 1``), ``MLP = Linear(d, H) -> ReLU ->
Linear(H, 1)``, one MLP per input width shared by every adapted module of the model (as the
authors' ``GlobalSparsegen``; ``ldmole_share: false`` gives each module its own). The first MLP
layer is linear in ``x``, so its ``H`` rows are fused with the router and expert projections.

Losses (per decoder layer, summed over layers):

* ``aux_loss`` (the authors' load balancing): ``E * sum_i f_i P_i`` with ``f_i`` the share of the
  active (token, expert) pairs going to expert ``i`` and ``P_i`` the mean *sparsegen* gate.
* ``sparsity_loss`` (the analytical sparsity control): with ``U_k`` the sum of the ``k`` largest
  logits (detached) and ``k = top_k``, at most ``k`` experts are active iff
  ``lambda >= 1 - (U_k - k u_(k+1))``; the loss is ``mean relu(1 - (U_k - k u_(k+1)) - lambda)``
  (zero when ``E <= k``). Weighted by ``sparsity_loss_coef``.

Open choices, as the authors' code does: init kaiming-uniform for the MLP weights and a bias of
-2.5 (``sparsegen_init: kaiming``), ``eps = 0.01``, and the hidden width of their
``conf/model/*.yaml`` (``hidden_sizes``: 128 for Qwen3-0.6B and Llama-3.2-1B, 256 for Qwen3-1.7B
and Llama-3.2-3B, 512 for Llama-3.1-8B): ``ldmole_hidden``, by default chosen from the base
model's parameter count (:func:`authors_hidden`; 128 for a router built alone). Unlike the
authors' code the router reads ``x`` without dropout, like every mola router.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.routing.base import Router, Routing
from mola.routing.losses import masked_mean
from mola.routing.registry import register

LAMBDA_EPS = 1e-2
DEFAULT_HIDDEN = 128  # the authors' conf/model/qwen3_0.6b.yaml and llama3.2_1b.yaml


def authors_hidden(num_parameters: int) -> int:
    """The lambda MLP width of the authors' configs for a base model of this size: 128 for
    Qwen3-0.6B and Llama-3.2-1B, 256 for Qwen3-1.7B and Llama-3.2-3B, 512 for Llama-3.1-8B."""
    if num_parameters < 1.5e9:
        return 128
    return 256 if num_parameters < 6e9 else 512


BIAS_INIT = -2.5


class LambdaMLP(nn.Module):
    """``lambda``'s network ``Linear(d, H) -> ReLU -> Linear(H, 1)``; kaiming weights, bias -2.5."""

    def __init__(self, in_features: int, hidden: int, **kw: Any) -> None:
        super().__init__()
        self.hidden_weight = nn.Parameter(torch.empty(hidden, in_features, **kw))
        self.hidden_bias = nn.Parameter(torch.empty(hidden, **kw))
        self.out_weight = nn.Parameter(torch.empty(1, hidden, **kw))
        self.out_bias = nn.Parameter(torch.empty(1, **kw))
        with torch.no_grad():
            for w in (self.hidden_weight, self.out_weight):
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.hidden_bias.fill_(BIAS_INIT)
            self.out_bias.fill_(BIAS_INIT)

    def lam(self, hidden_pre: Tensor) -> Tensor:
        """``lambda (N,)`` from the first layer's pre-activation ``x W_1^T`` ``(N, H)``."""
        h = F.relu(hidden_pre.float() + self.hidden_bias.float())
        out = F.linear(h, self.out_weight.float(), self.out_bias.float()).squeeze(-1)
        return F.logsigmoid(out) + (1.0 - LAMBDA_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.lam(F.linear(x, self.hidden_weight))


def sparsegen(logits: Tensor, lam: Tensor) -> Tensor:
    """Sparsegen-lin gates ``(N, E)`` of ``logits (N, E)`` with per-row ``lam (N,)`` (fp32)."""
    z = logits.float()
    lam = lam.float().unsqueeze(-1)
    z_sorted = z.sort(dim=-1, descending=True).values
    cum = z_sorted.cumsum(dim=-1)
    ks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    support = (1.0 - lam + ks * z_sorted) > cum
    k_z = support.sum(dim=-1, keepdim=True).clamp_min(1)
    top_sum = (z_sorted * support).sum(dim=-1, keepdim=True)
    tau = (top_sum - 1.0 + lam) / k_z
    return (z - tau).clamp_min(0.0) / (1.0 - lam).clamp_min(LAMBDA_EPS)


def sparsity_bound(logits: Tensor, k: int) -> Tensor:
    """``1 - (U_k - k u_(k+1))`` per row: the smallest ``lambda`` that keeps <= k experts."""
    u = logits.detach().float().sort(dim=-1, descending=True).values
    return 1.0 - (u[:, :k].sum(dim=-1) - k * u[:, k])


@register
class SparsegenRouter(Router):
    """LD-MoLE's sparsegen router (see the module docstring)."""

    name = "ldmole"
    description = "sparsegen on the simplex, token lambda from a shared MLP; dynamic k"
    paper = "Zhuang et al., LD-MoLE, ICLR 2026, arXiv 2509.25684"
    uses_top_k = True  # the sparsity loss' target k
    dynamic = True
    option_names = ("ldmole_hidden", "ldmole_share", "share")
    loss_names = ("aux_loss", "sparsity_loss")
    aux_loss_reduction = "module_mean"  # loss/loss.py: stack(per-module losses).mean()

    def build(self, in_features: int, **kw: Any) -> None:
        hidden = self.options.get("ldmole_hidden")
        hidden = DEFAULT_HIDDEN if hidden is None else int(hidden)
        if hidden < 1:
            raise ValueError(f"ldmole_hidden: must be >= 1, got {hidden}")
        share = self.options.get("share")
        if self.options.get("ldmole_share", True) and share is not None:
            key = ("ldmole", in_features, hidden, kw.get("dtype"))
            if key not in share:
                share[key] = LambdaMLP(in_features, hidden, **kw)
            self.lambda_mlp = share[key]
        else:
            self.lambda_mlp = LambdaMLP(in_features, hidden, **kw)

    def fused_sources(self) -> tuple[Tensor, ...]:
        return (self.weight, self.lambda_mlp.hidden_weight)

    def fused_weight(self) -> Tensor:
        return torch.cat([self.weight, self.lambda_mlp.hidden_weight])

    def gate(self, z: Tensor, x: Tensor) -> Routing:
        e = self.num_experts
        logits = z[:, :e]
        lam = self.lambda_mlp.lam(z[:, e:])
        gates = sparsegen(logits, lam)
        return Routing(logits, gates, gates > 0, {"lambda": lam})

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("ldmole routes with gate(): lambda depends on x")

    balance_normalise = True  # f_i: the share of the active (token, expert) pairs

    def balance_terms(self, record: Routing) -> tuple[Tensor, Tensor]:
        """Active pairs (``gates != 0``) and the sparsegen gates as ``P``."""
        return record.gates, record.gates

    def layer_losses(
        self,
        records: Sequence[Routing],
        attention_mask: Tensor | None = None,
        context: Mapping[str, Any] | None = None,
        global_batch: bool = False,
    ) -> dict[str, Tensor]:
        out = {"aux_loss": self.balance_loss(records, attention_mask, global_batch)}
        k = self.top_k
        if k is not None and k < self.num_experts:
            terms = [F.relu(sparsity_bound(r.logits, k) - r.extras["lambda"]) for r in records]
            out["sparsity_loss"] = masked_mean(
                torch.cat(terms), attention_mask, len(records), global_batch
            )
        else:
            out["sparsity_loss"] = records[0].gates.new_zeros(())
        return out
