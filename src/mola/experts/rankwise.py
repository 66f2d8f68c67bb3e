"""Rank-wise experts, SMoRA ("Each Rank Could be an Expert", arXiv 2501.15103, v2).

One LoRA of rank ``R`` (``lora_A (R, d_in)``, ``lora_B (d_out, R)``) whose ``R`` rank-1
components ``b_i a_i^T`` are the experts; a router ``W_g (R, d_in)`` picks ``k`` of the ``R``
ranks per token. By default (``smora_gating: sigmoid``) as the authors' code, StyxXuan/smora
``packages/peft/src/peft/tuners/srmole/layer.py`` (``SRMoLELinear.forward``)::

    s = sigmoid(W_g x) + b;   S = top_k(s);   g_i = k * s_i / sum_{j in S} s_j  (i in S)
    y = W x + (alpha / k) B diag(g) A x

the gates are the *biased* scores of the chosen ranks normalised and multiplied by ``k``, the
scale is ``alpha / activate_r``. ``b (R,)`` is the loss-free balancing bias (a buffer, not
trained): after every training forward ``b_i += u * sign(mean_j c_j - c_i)`` with ``c_i`` the
number of tokens that picked rank ``i``; ``u = balance_bias_rate``, by default the authors'
``bias_update_rate`` 1e-5 (0 freezes ``b`` at 0). The authors' router reads ``dropout(x)``; mola's
routers read ``x`` (the same with their configs' dropout 0).

``smora_gating: softmax`` keeps mola's earlier variant, the gating of "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts" (Wang et al. 2024, arXiv 2408.15664, which SMoRA's
balancing follows): ``p = softmax(W_g x)``, selection ``top_k(p + b)``, gates the *unbiased*
``p`` of the chosen ranks renormalised to sum 1, scale ``alpha / R``; with
``balance_bias_rate: 0`` the configured router (``topk``) decides alone.

``num_experts == r`` and the fast path is the stacked one with blocks of one column.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mola.experts.base import Experts, kaiming_


def update_balance_bias(bias: Tensor, mask: Tensor, rate: float) -> None:
    """Loss-free balancing: ``bias += rate * sign(mean load - load)`` (no host sync)."""
    with torch.no_grad():
        bias.add_(balance_step(mask, rate).to(bias.dtype))


def balance_step(mask: Tensor, rate: float) -> Tensor:
    """``rate * sign(mean load - load)`` ``(R,)`` for the selection ``mask (N, R)``."""
    counts = mask.reshape(-1, mask.shape[-1]).sum(dim=0, dtype=torch.float32)
    return rate * torch.sign(counts.mean() - counts)


def in_backward() -> bool:
    """Whether this code runs inside the autograd engine: the forward recomputed by activation
    checkpointing during the backward pass."""
    return torch._C._current_graph_task_id() != -1


class BalanceBias:
    """The loss-free balancing bias' update, once per training forward, also under activation
    checkpointing.

    A forward records its step in ``lora_balance_pending`` and the next forward (training or
    not) adds it to the bias before it selects. The forward recomputed in the backward pass
    (non-reentrant checkpointing) neither adds nor records, so it selects with the same bias as
    the original forward (the same experts, as checkpointing requires) and the bias moves once
    per forward, as without checkpointing. The last forward's step stays pending until the next
    forward (it is applied before any later use of the bias).
    """

    lora_balance_bias: Tensor
    lora_balance_pending: Tensor
    training: bool

    def balance_bias(self) -> Tensor:
        """The bias to select with now (pending steps applied first)."""
        if not in_backward():
            with torch.no_grad():
                self.lora_balance_bias.add_(self.lora_balance_pending)
                self.lora_balance_pending.zero_()
        return self.lora_balance_bias

    def record_balance(self, mask: Tensor, rate: float) -> None:
        """After a training forward's selection: its step becomes pending."""
        if self.training and rate > 0 and not in_backward():
            with torch.no_grad():
                self.lora_balance_pending.copy_(balance_step(mask, rate))


def top_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean ``(N, R)`` mask of each row's ``k`` largest scores."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


class RankWiseExperts(BalanceBias, Experts):
    """SMoRA: every rank of one rank-``R`` LoRA is an expert."""

    structure = "rankwise"
    rank_experts = True
    rank_experts_gated = True  # a learned router gates the ranks (FlyLoRA: no)
    default_bias_rate = 1e-5  # the authors' bias_update_rate

    def __init__(self, d_in: int, d_out: int, num_experts: int, r: int, lora_alpha: float,
                 options=None, **factory) -> None:  # fmt: skip
        super().__init__(d_in, d_out, num_experts, r, lora_alpha, options, **factory)
        if num_experts != r:
            raise ValueError(
                f"num_experts: a rank-wise structure has one expert per rank, so num_experts "
                f"must equal r ({r}), got {num_experts}"
            )
        self.block = 1
        self.top_k = self.options.top_k
        rate = self.options.balance_bias_rate
        self.bias_rate = self.default_bias_rate if rate is None else rate
        self.gating = self.options.smora_gating
        if self.gating not in ("sigmoid", "softmax"):
            raise ValueError(f"smora_gating: 'sigmoid' or 'softmax', got {self.gating!r}")
        if self.gating == "sigmoid" and self.top_k is not None and self.rank_experts_gated:
            self.scaling = lora_alpha / self.top_k  # the authors' alpha / activate_r
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **self.factory))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **self.factory))
        self.register_buffer(
            "lora_balance_bias", torch.zeros(r, dtype=torch.float32, device=self.factory["device"])
        )
        self.register_buffer(
            "lora_balance_pending",
            torch.zeros(r, dtype=torch.float32, device=self.factory["device"]),
            persistent=False,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_(self.lora_A)
            self.lora_B.zero_()
            self.lora_balance_bias.zero_()
            if hasattr(self, "lora_balance_pending"):
                self.lora_balance_pending.zero_()

    def down_weight(self) -> Tensor:
        return self.lora_A

    def up_weight(self) -> Tensor:
        return self.lora_B

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A.unsqueeze(1), self.lora_B.t().unsqueeze(-1)

    @property
    def biased_routing(self) -> bool:
        """Whether selection uses the balancing bias (else the configured router decides)."""
        if self.top_k is None:
            return False
        return self.gating == "sigmoid" or self.bias_rate > 0

    def route_biased(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Gates and mask (see the module docstring): ``sigmoid``: ``top_k(s + b)`` selects and
        ``k`` times the normalised biased scores weigh; ``softmax``: ``top_k(p + b)`` selects and
        the selected ``p`` renormalised weigh."""
        tiny = torch.finfo(torch.float32).tiny
        if self.gating == "sigmoid":
            scores = torch.sigmoid(logits.float()) + self.balance_bias()
            mask = top_mask(scores.detach(), self.top_k)
            gates = scores * mask
            gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(tiny) * self.top_k
        else:
            probs = torch.softmax(logits.float(), dim=-1)
            mask = top_mask(probs + self.balance_bias(), self.top_k)
            gates = probs * mask
            gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(tiny)
        self.record_balance(mask, self.bias_rate)
        return gates, mask
