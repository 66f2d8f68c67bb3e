"""LoRAMoE: soft routing with the localized balancing constraint (Dou et al. 2024).

"LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style Plugin",
ACL 2024, arXiv 2312.09979 (v4 followed).

Every expert is used, weighted by ``p = softmax(W x)`` (as the ``soft`` router). The experts are
split into ``lbc_groups`` contiguous groups (``numpy.array_split`` sizes) and each training
example may carry a type ``group`` in ``0..lbc_groups-1`` (the optional ``group`` field of the
user's data; examples without one are neutral). For one module, with ``Q_{n,e}`` the summed
gate of expert ``e`` over the tokens of example ``n`` (padding excluded) and the coefficient
``I_{n,e} = 1 + delta`` when expert ``e`` belongs to the example's group, ``1 - delta`` when it
does not (``1`` for an example without a type), the loss is ``Var(Z) / Mean(Z)`` over all the
entries of ``Z = I * Q`` (population variance). ``lbc_loss`` averages it over the layer's
modules; its weight is ``lbc_loss_coef``, ``delta`` is ``lbc_delta`` (0.1 in the paper).
Without types it reduces to balancing the experts' importance across examples and experts.
The loss is per batch, not per example: ``Z`` has a row per example and the variance runs over
all its entries. Under data parallelism (``global_batch``) ``Z`` is the matrix of the *global*
batch, every process's examples stacked (the sums of ``Z`` and ``Z^2`` all-reduced), so
N processes with batch b compute the loss one process computes with batch N*b; the
coefficients ``I`` still come from each example's own type.
The softmax load-balancing loss (``aux_loss``) is kept with its usual weight (the ``loramoe``
preset sets it to 0, as the paper uses only the constraint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
        owner = expert_groups(e, groups).to(q.device)
        group = group.reshape(-1).to(q.device)
        match = group[:, None] == owner[None, :]
        typed = (group >= 0)[:, None]
        coef = torch.where(typed, torch.where(match, 1.0 + delta, 1.0 - delta), coef)
    return coef * q


def variance_over_mean(z: Sequence[Tensor], global_batch: bool = False) -> Tensor:
    """``Var(Z) / Mean(Z)`` (population variance) of each module's ``Z``, averaged over modules.

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
    var = (sums[:, 1] / count - mean.square()).clamp_min(0.0)
    return (var / mean.clamp_min(1e-9)).mean().float()


def localized_balance_loss(
    gates: Tensor,
    batch: int,
    group: Tensor | None,
    attention_mask: Tensor | None,
    groups: int,
    delta: float,
) -> Tensor:
    """``Var(I * Q) / Mean(I * Q)`` of one module (see the module docstring)."""
    return variance_over_mean([importance(gates, batch, group, attention_mask, groups, delta)])


@register
class LoRAMoERouter(SoftRouter):
    """LoRAMoE's router: soft gates, localized balancing constraint over expert groups."""

    name = "loramoe"
    description = "every expert by softmax(Rx), localized balancing over expert groups"
    paper = "Dou et al., LoRAMoE, ACL 2024, arXiv 2312.09979"
    option_names = ("lbc_groups", "lbc_delta")
    loss_names = ("aux_loss", "lbc_loss")

    def layer_losses(
        self,
        records: Sequence[Routing],
        attention_mask: Tensor | None = None,
        context: Mapping[str, Tensor] | None = None,
        global_batch: bool = False,
    ) -> dict[str, Tensor]:
        out = super().layer_losses(records, attention_mask, context, global_batch)
        group = (context or {}).get("group")
        if attention_mask is not None:
            batch = attention_mask.shape[0]
        else:
            batch = group.shape[0] if group is not None else 1
        groups = int(self.options.get("lbc_groups", 2))
        delta = float(self.options.get("lbc_delta", 0.1))
        z = [importance(r.gates, batch, group, attention_mask, groups, delta) for r in records]
        out["lbc_loss"] = variance_over_mean(z, global_batch)
        return out
