"""FlyLoRA (arXiv 2510.08396, NeurIPS 2025; authors' code gfyddha/FlyLoRA).

A rank-``R`` LoRA whose down-projection is a *frozen sparse random* matrix and whose ranks are
the experts, with no router parameters: ``A x`` itself routes (the implicit router)::

    h = A x;   S = top_k(|h| + d);   y = W x + (alpha / R) B (1_S ⊙ h)

* ``lora_A (R, d_in)``: a buffer, never trained. Each row has ``p`` nonzero entries at random
  columns, drawn from ``N(0, 1/R^2)``: by default ``p = d_in // (R // k)`` as the authors' code
  (``flylora.py``; it differs from ``d_in * k / R`` when ``k`` does not divide ``R``), or
  ``max(1, int(d_in * fly_sparsity))`` when ``fly_sparsity`` is set.
* ``lora_B (d_out, R)``: zero-initialised, the only trained tensor.
* ``d (R,)`` (``lora_balance_bias``, a buffer): after every training forward
  ``d_i += u * sign(mean_j c_j - c_i)``, ``c_i`` the tokens that picked rank ``i``; ``u =
  balance_bias_rate`` (0.001 in the authors' MMLU script); once per forward also under
  activation checkpointing (:class:`~mola.experts.rankwise.BalanceBias`).

Choices the paper leaves open: the authors' minimal ``flylora.py`` ranks ``|h + d|`` while
their PEFT fork ranks ``h + d`` (no magnitude); mola ranks ``|h| + d`` (the magnitude of the
projection, as the paper describes, with the bias added to the score). The selected ranks
pass ``h`` unweighted (gate 1), as in both versions of the code. The fork also updates ``d``
during evaluation; mola only in training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mola.experts.rankwise import RankWiseExperts, top_mask


class FlyLoRAExperts(RankWiseExperts):
    """FlyLoRA: frozen sparse random ``A`` as the implicit router, only ``B`` trained."""

    structure = "flylora"
    learned_router = False
    rank_experts_gated = False
    default_bias_rate = 1e-3  # the authors' run_mmlu.sh

    def __init__(self, d_in: int, d_out: int, num_experts: int, r: int, lora_alpha: float,
                 options=None, **factory) -> None:  # fmt: skip
        super().__init__(d_in, d_out, num_experts, r, lora_alpha, options, **factory)
        if self.top_k is None or not 1 <= self.top_k <= r:
            raise ValueError(f"top_k: FlyLoRA activates top_k of r={r} ranks; got {self.top_k}")
        if self.options.fly_sparsity is None:  # the authors' d // (r // k)
            self.nonzeros = max(1, d_in // max(1, r // self.top_k))
        else:
            self.nonzeros = max(1, int(d_in * self.options.fly_sparsity))
        frozen = self.lora_A.detach()
        del self.lora_A
        self.register_buffer("lora_A", frozen)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not hasattr(self, "nonzeros"):  # called by the parent before the buffer exists
            return super().reset_parameters()
        with torch.no_grad():
            r, d_in = self.lora_A.shape
            cols = torch.rand(r, d_in, device=self.lora_A.device).argsort(dim=-1)
            keep = torch.zeros(r, d_in, dtype=torch.bool, device=self.lora_A.device)
            keep.scatter_(-1, cols[:, : self.nonzeros], True)
            values = torch.randn(r, d_in, device=self.lora_A.device) / r
            self.lora_A.copy_(values * keep)
            self.lora_B.zero_()
            self.lora_balance_bias.zero_()

    def implicit_gates(self, h: Tensor) -> Tensor:
        """``1`` for the ``top_k`` ranks of ``|h| + d`` per token, else ``0``."""
        mask = top_mask(h.detach().float().abs() + self.balance_bias(), self.top_k)
        self.record_balance(mask, self.bias_rate)
        return mask.to(h.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_k={self.top_k}, nonzeros/row={self.nonzeros}"
