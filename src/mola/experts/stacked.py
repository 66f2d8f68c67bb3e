"""Stacked experts (MoLA): ``E`` independent rank-``r`` LoRAs.

``lora_A (E, r, d_in)``, ``lora_B (E, d_out, r)``;
``y = W x + (alpha / r) sum_e g_e B_e A_e x``. With one expert and no router it is a plain LoRA.

Experts of different ranks in one module (``StructureOptions.expert_ranks``, GuiLoMo's
granularity): expert ``e`` uses only its first ``r_e <= r`` rank components. The tensors keep the
module's largest rank ``r``; a fixed mask ``lora_rank_mask (E, r)`` zeroes the other rows of
``A_e`` in every forward (so they receive no gradient and never act) and the scale stays
``alpha / r`` for every expert, as in GuiLoMo's code (``scaling = lora_alpha / r`` with a rank mask
on ``A``). The fast path is unchanged: one matmul over the masked ``A``.
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
        ranks = self.options.expert_ranks
        if ranks is not None:
            if len(ranks) != num_experts or not all(1 <= int(q) <= r for q in ranks):
                raise ValueError(
                    f"expert_ranks: {num_experts} ranks in 1..{r} (one per expert), got {ranks}"
                )
            cols = torch.arange(r, device=self.factory["device"])
            limit = torch.tensor([int(q) for q in ranks], device=self.factory["device"])
            mask = (cols[None, :] < limit[:, None]).to(self.factory["dtype"] or torch.float32)
            self.register_buffer("lora_rank_mask", mask, persistent=False)
        else:
            self.lora_rank_mask = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every ``A_e`` as ``nn.Linear`` does (kaiming-uniform, a=sqrt 5); ``B = 0``."""
        with torch.no_grad():
            for a in self.lora_A:
                kaiming_(a)
            self.lora_B.zero_()
            if getattr(self, "lora_rank_mask", None) is not None:
                self.lora_A.mul_(self.lora_rank_mask.unsqueeze(-1))

    def masked_a(self) -> Tensor:
        """``lora_A`` with each expert's rows beyond its own rank zeroed (``expert_ranks``)."""
        if self.lora_rank_mask is None:
            return self.lora_A
        return self.lora_A * self.lora_rank_mask.unsqueeze(-1).to(self.lora_A.dtype)

    def down_weight(self) -> Tensor:
        return self.masked_a().reshape(self.num_experts * self.r, self.in_features)

    def up_weight(self) -> Tensor:
        # [o, e*r + j] = B[e, o, j]
        return self.lora_B.transpose(0, 1).reshape(self.out_features, self.num_experts * self.r)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.masked_a(), self.lora_B
