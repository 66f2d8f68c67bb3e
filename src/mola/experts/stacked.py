"""Stacked experts (MoLA): ``E`` independent rank-``r`` LoRAs.

``lora_A (E, r, d_in)``, ``lora_B (E, d_out, r)``;
``y = W x + (alpha / r) sum_e g_e B_e A_e x``. With one expert and no router it is a plain LoRA.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mola.experts.base import Experts, kaiming_


class StackedExperts(Experts):
    """``E`` independent LoRA experts of rank ``r`` (MoLA, MixLoRA, LoRAMoE...)."""

    structure = "stacked"

    def __init__(self, d_in: int, d_out: int, num_experts: int, r: int, lora_alpha: float,
                 options=None, **factory) -> None:  # fmt: skip
        super().__init__(d_in, d_out, num_experts, r, lora_alpha, options, **factory)
        self.block = r
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, d_in, **self.factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, r, **self.factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every ``A_e`` as ``nn.Linear`` does (kaiming-uniform, a=sqrt 5); ``B = 0``."""
        with torch.no_grad():
            for a in self.lora_A:
                kaiming_(a)
            self.lora_B.zero_()

    def down_weight(self) -> Tensor:
        return self.lora_A.reshape(self.num_experts * self.r, self.in_features)

    def up_weight(self) -> Tensor:
        # [o, e*r + j] = B[e, o, j]
        return self.lora_B.transpose(0, 1).reshape(self.out_features, self.num_experts * self.r)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A, self.lora_B
