"""Core-space experts, CoMoL ("Efficient Mixture of LoRA Experts via Dynamic Core Space
Merging", arXiv 2603.00573, v1).

A shared LoRA ``lora_A (r, d_in)``, ``lora_B (d_out, r)`` and ``E`` small core matrices
``lora_C (E, r, r)``; the router reads the low-rank projection ``h = A x`` (``W_r (E, r)``, the
paper's router "projected into the same low-rank space"), and the cores are soft-merged per
token into one core. As the authors' code, DCDmllm/CoMoL ``CoMoL/src/mocorelora/layer.py``
(``LinearMoCoreLoraLayer.forward`` with ``core_router=True``)::

    h = A drop(x);   g = softmax(W_r h);   C(x) = sum_e g_e C_e
    y = W x + (alpha / r) B drop(drop(C(x)) h)

with every core merged (the ``soft`` router; another router, e.g. ``topk``, merges only the
cores it selects, a mola variant) and the same dropout at three places in training: on ``x``,
on the entries of the merged core and on ``C(x) h``. ``A`` kaiming-uniform, ``B = 0`` and every
core kaiming-uniform (``nn.init.kaiming_uniform_(core, a=sqrt 5)``) as theirs. mola's
``lora_C[e]`` is the transpose of their core (they compute ``h^T C``): the same function class
and the same initial distribution.

Fast path (no core dropout: evaluation, or dropout 0): the outer product ``g ⊗ h``
(``N x E*r``) times ``[C_1 ... C_E]`` (``r x E*r``) is ``C(x) h``; then one matmul with ``B``.
Nothing of size ``d`` is formed per expert. With the core dropout (training) the merged core is
formed per token (``N x r x r``), as in the authors' code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.experts.base import Experts, kaiming_
from mola.experts.fastpath import add_projection


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

    def mix(self, result: Tensor, h: Tensor, gates: Tensor | None) -> Tensor:
        """The authors' training forward with dropout on the merged core and on ``C(x) h``;
        otherwise (evaluation, dropout 0) the fast path."""
        p = self.options.dropout
        if not (self.training and p > 0) or gates is None:
            return super().mix(result, h, gates)
        merged = torch.einsum("ne,eij->nij", gates.to(self.lora_C.dtype), self.lora_C)
        merged = F.dropout(merged, p, training=True)
        z = torch.einsum("nij,nj->ni", merged, h.to(merged.dtype))
        z = F.dropout(z, p, training=True) * self.scaling
        return add_projection(result, z.to(self.lora_B.dtype), self.lora_B)

    def factors(self) -> tuple[Tensor, Tensor]:
        b_eff = torch.einsum("or,erj->eoj", self.lora_B, self.lora_C)
        return self.lora_A.expand(self.num_experts, -1, -1), b_eff
