"""Shared-``A`` experts: HydraLoRA (arXiv 2404.19245) and MoSLD (arXiv 2412.08946).

One down-projection ``lora_A (r, d_in)`` shared by all experts, ``E`` up-projections
``lora_B (E, d_out, r)``::

    y = W x + (alpha / r) sum_e g_e B_e A x

The fast path computes ``h = A x`` once (``N x r``) and the outer product ``g ⊗ h`` (``N x E*r``)
feeds one matmul with ``[B_1 ... B_E]``.

HydraLoRA (authors' code, Clin0212/HydraLoRA ``peft/tuners/lora.py``): ``A`` kaiming-uniform,
every ``B_e`` zero, router ``softmax(W_r x)`` over all heads (the ``soft`` router), no balance
loss. MoSLD (the COLING 2025 paper; no public code found): the same sharing with top-k routing,
plus dropout on the *entries of the shared matrix*: during training each forward uses
``A' = M ⊙ A / (1 - p)`` with ``M ~ Bernoulli(1 - p)`` (``a_dropout``); its gradient reaches
only the kept entries. The paper initialises ``A`` from a Gaussian; here it is kaiming-uniform
like HydraLoRA and ``nn.Linear`` (an open choice).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mola.experts.base import Experts, kaiming_


class SharedAExperts(Experts):
    """One shared ``A``, ``E`` heads ``B_e`` (HydraLoRA; MoSLD with ``a_dropout > 0``)."""

    structure = "shared_a"

    def __init__(self, d_in: int, d_out: int, num_experts: int, r: int, lora_alpha: float,
                 options=None, **factory) -> None:  # fmt: skip
        super().__init__(d_in, d_out, num_experts, r, lora_alpha, options, **factory)
        self.block = r
        self.a_dropout = self.options.a_dropout
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **self.factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, r, **self.factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_(self.lora_A)
            self.lora_B.zero_()

    def down_weight(self) -> Tensor:
        p = self.a_dropout
        if self.training and p > 0:  # MoSLD: drop entries of the shared A, rescale the rest
            keep = torch.rand_like(self.lora_A) >= p
            return self.lora_A * keep / (1.0 - p)
        return self.lora_A

    def up_weight(self) -> Tensor:
        return self.lora_B.transpose(0, 1).reshape(self.out_features, self.num_experts * self.r)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A.expand(self.num_experts, -1, -1), self.lora_B

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", a_dropout={self.a_dropout:g}" if self.a_dropout else "")
