"""Core-space experts, CoMoL ("Efficient Mixture of LoRA Experts via Dynamic Core Space
Merging", arXiv 2603.00573, v1).

A shared LoRA ``lora_A (r, d_in)``, ``lora_B (d_out, r)`` and ``E`` small core matrices
``lora_C (E, r, r)``; the router reads the low-rank projection ``h = A x`` (``W_r (E, r)``, the
paper's router "projected into the same low-rank space"), and the selected cores are soft-merged
per token into one core::

    h = A x;   g = route(W_r h);   y = W x + (alpha / r) B (sum_e g_e C_e) h

Fast path: the outer product ``g ⊗ h`` (``N x E*r``) times ``[C_1 ... C_E]`` (``r x E*r``) is
``C(x) h``; then one matmul with ``B``. Nothing of size ``d`` is formed per expert.

Open choices (no public code found): ``A`` kaiming-uniform and ``B = 0`` as in LoRA (so a
fresh model equals its base model); every core initialised like ``nn.Linear(r, r)``
(kaiming-uniform) so the experts start distinct; which cores are active is the configured router's
choice (``topk`` by default; ``soft`` merges all of them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mola.experts.base import Experts, kaiming_


class CoreSpaceExperts(Experts):
    """CoMoL: ``E`` ``r x r`` cores between one shared ``A`` and ``B``, routed on ``A x``."""

    structure = "core"
    router_reads_h = True

    def __init__(self, d_in: int, d_out: int, num_experts: int, r: int, lora_alpha: float,
                 options=None, **factory) -> None:  # fmt: skip
        super().__init__(d_in, d_out, num_experts, r, lora_alpha, options, **factory)
        self.block = r
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **self.factory))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **self.factory))
        self.lora_C = nn.Parameter(torch.empty(num_experts, r, r, **self.factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            kaiming_(self.lora_A)
            self.lora_B.zero_()
            for core in self.lora_C:
                kaiming_(core)

    def down_weight(self) -> Tensor:
        return self.lora_A

    def combine(self, z: Tensor) -> Tensor:
        """``(g ⊗ h) [C_1..C_E]^T = (sum_e g_e C_e) h``: ``(N, E*r) -> (N, r)``."""
        cores = self.lora_C.permute(1, 0, 2).reshape(self.r, self.num_experts * self.r)
        return z @ cores.t()

    def up_weight(self) -> Tensor:
        return self.lora_B

    def factors(self) -> tuple[Tensor, Tensor]:
        b_eff = torch.einsum("or,erj->eoj", self.lora_B, self.lora_C)
        return self.lora_A.expand(self.num_experts, -1, -1), b_eff
