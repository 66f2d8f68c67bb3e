"""LoRAMoE: soft routing with the localized balancing constraint (Dou et al. 2024).

"LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style Plugin",
ACL 2024, arXiv 2312.09979 (v4 followed); the authors' code Ablustrund/LoRAMoE
(``peft/tuners/lora.py``: ``Linear.forward`` and ``cv_squared``; the per-module losses are added
up over modules in ``transformers/models/llama/modeling_llama.py``).

Every expert is used, weighted by ``p = softmax(W x)`` (as the ``soft`` router). Each training
example may carry a type ``group`` (the optional ``group`` field of the user's data). For one
module, ``Q_{n,e}`` is the summed gate of expert ``e`` over the tokens of example ``n`` and
``I_{n,e}`` is ``1 + delta`` when expert ``e`` serves the example's type, else ``1 - delta``;
the loss is the authors' ``cv_squared``: ``Var(Z) / (Mean(Z)^2 + 1e-10)`` over all entries of
``Z = I * Q`` with the unbiased (``n - 1``) variance, i.e. the squared coefficient of variation
(scale-invariant). ``lbc_loss`` is that loss per module, summed over modules
(``aux_loss_reduction: module_sum``, the authors' aggregation); its weight is
``lbc_loss_coef``, ``delta`` is ``lbc_delta`` (the authors' ``blc_weight``/``blc_alpha``).

Which experts serve which type follows the authors' code: with ``lbc_groups`` 2 (theirs) type 1
is served by the first half of the experts and type 0 by the second half
(``concat((type==1).repeat(E//2), (type==0).repeat(E//2))``); a type outside the groups gets
``1 - delta`` on every expert, as in their code. In general the experts are split into
``lbc_groups`` contiguous groups (``numpy.array_split`` sizes) and type ``t`` is served by group
``G - 1 - t``. mola's additions: an example without a type (``-1``, what the data collator
writes when the field is missing) gets ``I = 1`` (neutral), and padding tokens are left out of
``Q`` (the authors sum every position). Without an attention mask each example is one row of
``Z`` (the model passes the batch size in the loss context).

Under data parallelism (``global_batch``) ``Z`` is the matrix of the *global* batch, every
process's examples stacked (the sums of ``Z`` and ``Z^2`` all-reduced), so N processes with
batch b compute the loss one process computes with batch N*b; the coefficients ``I`` still come
from each example's own type. The softmax load-balancing loss (``aux_loss``) is kept with its
usual weight (the ``loramoe`` preset sets it to 0, as the paper uses only the constraint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mola.routing.base import Routing
from mola.routing.registry import register
from mola.routing.simple import SoftRouter
from mola.utils.distributed import global_sums


def expert_groups(num_experts: int, groups: int) -> Tensor:
    """The group of each expert: contiguous, the first ``E % G`` groups one larger."""
    sizes = [num_experts // groups + (1 if g < num_experts % groups else 0) for g in range(groups)]
    return torch.repeat_interleave(torch.arange(groups), torch.tensor(sizes))


def importance(
    gates: Tensor,
    batch: int,
    group: Tensor | None,
    attention_mask: Tensor | None,
    groups: int,
    delta: float,
) -> Tensor:
    """``Z = I * Q`` ``(B, E)`` of one module: each example's weighted importance per expert."""
    e = gates.shape[-1]
    g = gates.float().reshape(batch, -1, e)
    if attention_mask is not None:
        g = g * attention_mask.reshape(batch, -1, 1).to(g.device, torch.float32)
    q = g.sum(dim=1)  # (B, E)
    coef = torch.ones_like(q)
    if group is not None:
        serves = (groups - 1 - expert_groups(e, groups)).to(q.device)  # the type each serves
        group = group.reshape(-1).to(q.device)
        match = group[:, None] == serves[None, :]
        typed = (group >= 0)[:, None]
        coef = torch.where(typed, torch.where(match, 1.0 + delta, 1.0 - delta), coef)
    return coef * q


def cv_squared(z: Sequence[Tensor], global_batch: bool = False) -> Tensor:
    """The authors' ``cv_squared`` of each module's ``Z``: ``Var(Z) / (Mean(Z)^2 + 1e-10)``
    with the unbiased variance (0 for a single entry), one value per module ``(M,)``.

    Computed from the sums of ``Z`` and ``Z^2`` in fp64 (the variance of nearly equal entries
    is a small difference of large sums); ``global_batch``: those sums and the entry count are
    taken over all processes, so ``Z`` is the importance matrix of the whole global batch.
    """
    zs = [t.double() for t in z]
    sums = torch.stack([torch.stack([t.sum(), t.square().sum()]) for t in zs])  # (M, 2)
    count = torch.tensor([float(zs[0].numel())], device=sums.device, dtype=sums.dtype)
    if global_batch:
        sums, count = global_sums(sums, count)
    mean = sums[:, 0] / count
    if float(count) <= 1:
        return torch.zeros_like(mean).float()
    var = ((sums[:, 1] - count * mean.square()) / (count - 1)).clamp_min(0.0)
    return (var / (mean.square() + 1e-10)).float()


def localized_balance_loss(
    gates: Tensor,
    batch: int,
    group: Tensor | None,
    attention_mask: Tensor | None,
    groups: int,
    delta: float,
) -> Tensor:
    """The authors' ``cv_squared(I * Q)`` of one module (see the module docstring)."""
    return cv_squared([importance(gates, batch, group, attention_mask, groups, delta)])[0]


@register
class LoRAMoERouter(SoftRouter):
    """LoRAMoE's router: soft gates, localized balancing constraint over expert groups."""

    name = "loramoe"
    description = "every expert by softmax(Rx), localized balancing over expert groups"
    paper = "Dou et al., LoRAMoE, ACL 2024, arXiv 2312.09979"
    option_names = ("lbc_groups", "lbc_delta")
    loss_names = ("aux_loss", "lbc_loss")
    aux_loss_reduction = "module_sum"  # each module returns its blcls; the model adds them

    def layer_losses(
        self,
        records: Sequence[Routing],
        attention_mask: Tensor | None = None,
        context: Mapping[str, Any] | None = None,
        global_batch: bool = False,
    ) -> dict[str, Tensor]:
        out = super().layer_losses(records, attention_mask, context, global_batch)
        group = (context or {}).get("group")
        if attention_mask is not None:
            batch = attention_mask.shape[0]
        elif group is not None:
            batch = group.shape[0]
        else:
            batch = int((context or {}).get("batch_size", 1))
        groups = int(self.options.get("lbc_groups", 2))
        delta = float(self.options.get("lbc_delta", 0.1))
        z = [importance(r.gates, batch, group, attention_mask, groups, delta) for r in records]
        out["lbc_loss"] = cv_squared(z, global_batch).sum()
        return out
