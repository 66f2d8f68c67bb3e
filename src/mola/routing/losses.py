"""Auxiliary router losses: MoLA's load-balancing loss and the router z-loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from mola.utils.distributed import global_sums


class Selects(Protocol):
    """What :func:`load_balancing_loss` needs of a router: its choice of experts per row."""

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]: ...


def load_balancing_loss(
    logits: Sequence[Tensor],
    router: Selects,
    attention_mask: Tensor | None = None,
    global_batch: bool = False,
    *,
    masks: Sequence[Tensor] | None = None,
) -> Tensor:
    """MoLA's load-balancing loss for one decoder layer.

    The logits of all of the layer's adapted modules are stacked row-wise (``tokens x modules``
    rows, ``E`` columns). With ``f_i`` the share of the selected (row, expert) assignments that go
    to expert ``i`` (so ``sum_i f_i = 1``) and ``P_i`` the mean router probability of expert ``i``
    over the rows, the loss is ``E * sum_i f_i * P_i``; it equals 1 for a perfectly uniform router.
    This follows the MoLA paper's code. MoE-PEFT instead counts ``f_i`` per top-k slot, which makes
    ``sum_i f_i = k`` and the loss ``k`` times larger.

    Data parallelism (``global_batch=True`` with a ``torch.distributed`` group of N > 1
    processes): ``f_i`` and ``P_i`` are taken over the global batch, not each process's share.
    The selection counts, the probability sums and the row counts are summed over processes
    (one all-reduce per layer), so every process gets the loss of the whole batch. The gradient
    reaches only this process's own probabilities, multiplied by N, because DDP/FSDP/DeepSpeed
    average gradients over processes: N processes with batch b then step exactly like one
    process with batch N*b (tested with 2 gloo processes against one). A per-process loss would
    instead balance each shard separately, which is a different (and noisier) objective.

    Args:
        logits: router logits of each module, each ``(N, E)`` (or ``(B, T, E)``).
        router: the layer's router; it decides which assignments count as selected.
        attention_mask: optional ``(B, T)`` mask; rows where it is 0 (padding) are left out.
        global_batch: sum the statistics over the processes of the process group (a collective:
            every process must call it for the same layers); without a group it changes nothing.
        masks: the selection masks the modules actually used (same shapes as ``logits``); by
            default ``router.select(softmax(logits))``. Routers whose choice depends on more
            than the logits (learned thresholds, sparsegen) pass theirs.

    Returns:
        A scalar fp32 tensor.
    """
    z, keep = _stack(logits, attention_mask)
    probs = torch.softmax(z.float(), dim=-1)
    if masks is None:
        _, mask = router.select(probs)
    else:
        mask = torch.cat([m.reshape(-1, m.shape[-1]) for m in masks], dim=0).bool()
    if keep is not None:
        probs = probs * keep[:, None]
        mask = mask & keep[:, None].bool()
        rows = keep.sum()
    else:
        rows = torch.tensor(float(probs.shape[0]), device=probs.device)
    counts = mask.sum(dim=0).float()
    p_sum = probs.sum(dim=0)
    if global_batch:
        p_sum, plain = global_sums(p_sum, torch.cat([counts, rows.reshape(1)]))
        counts, rows = plain[:-1], plain[-1]
    f = counts / counts.sum().clamp_min(1)
    p_mean = p_sum / rows.clamp_min(1)
    return probs.shape[-1] * (f * p_mean).sum()


def router_z_loss(
    logits: Sequence[Tensor], attention_mask: Tensor | None = None, global_batch: bool = False
) -> Tensor:
    """Router z-loss for one layer: the mean over rows of ``logsumexp(z)^2`` (ST-MoE).

    ``global_batch``: the mean over the rows of all processes, with the gradient scaled as in
    :func:`load_balancing_loss`.
    """
    z, keep = _stack(logits, attention_mask)
    sq = torch.logsumexp(z.float(), dim=-1).square()
    if keep is not None:
        sq = sq * keep
        rows = keep.sum()
    else:
        rows = torch.tensor(float(sq.shape[0]), device=sq.device)
    total = sq.sum()
    if global_batch:
        total, rows = global_sums(total.reshape(1), rows.reshape(1))
        total, rows = total[0], rows[0]
    return total / rows.clamp_min(1)


def _stack(logits: Sequence[Tensor], attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    rows = [t.reshape(-1, t.shape[-1]) for t in logits]
    z = torch.cat(rows, dim=0)
    if attention_mask is None:
        return z, None
    flat = attention_mask.reshape(-1).to(device=z.device, dtype=torch.float32)
    if any(r.shape[0] != flat.shape[0] for r in rows):
        raise ValueError(
            f"attention_mask has {flat.shape[0]} tokens but the router saw "
            f"{[r.shape[0] for r in rows]} rows; pass a mask matching the input"
        )
    return z, flat.repeat(len(rows))


def masked_mean(
    values: Tensor, attention_mask: Tensor | None, repeats: int = 1, global_batch: bool = False
) -> Tensor:
    """Mean of per-row ``values`` (rows = ``repeats`` modules x tokens), padding left out.

    ``global_batch``: the mean over the rows of all processes (the sum and the row count
    all-reduced), with the gradient scaled as in :func:`load_balancing_loss`.
    """
    v = values.float()
    if attention_mask is None:
        total, rows = v.sum(), torch.tensor(float(v.numel()), device=v.device)
    else:
        keep = attention_mask.reshape(-1).to(device=v.device, dtype=torch.float32)
        keep = keep.repeat(repeats)
        total, rows = (v * keep).sum(), keep.sum()
    if global_batch:
        total, rows = global_sums(total.reshape(1), rows.reshape(1))
        total, rows = total[0], rows[0]
    return total / rows.clamp_min(1)


def share_balance_loss(
    assign: Sequence[Tensor],
    probs: Sequence[Tensor],
    attention_mask: Tensor | None = None,
    *,
    normalise: bool,
    count: bool = True,
    global_batch: bool = False,
) -> Tensor:
    """``E * sum_i f_i P_i`` from explicit per-row assignments and probabilities.

    The balance loss of routers whose gates are not a rule on ``softmax(z)``. Rows of all the
    layer's modules are stacked; ``P_i`` is the mean of ``probs[:, i]`` over rows and ``f_i`` the
    mean of ``assign[:, i]`` (``count``: of ``assign != 0``), divided by its sum over experts
    when ``normalise`` (then ``sum_i f_i = 1``). Padding rows are left out.

    ``global_batch``: the sums of ``assign`` and ``probs`` and the row count are taken over all
    processes (one all-reduce), the gradient scaled as in :func:`load_balancing_loss`.
    """
    a = torch.cat([t.reshape(-1, t.shape[-1]) for t in assign]).float()
    p = torch.cat([t.reshape(-1, t.shape[-1]) for t in probs]).float()
    if count:
        a = (a != 0).float()
    if attention_mask is not None:
        keep = attention_mask.reshape(-1).to(device=a.device, dtype=torch.float32)
        keep = keep.repeat(len(assign))[:, None]
        a, p = a * keep, p * keep
        rows = keep.sum()
    else:
        rows = torch.tensor(float(a.shape[0]), device=a.device)
    e = a.shape[-1]
    a_sum, p_sum = a.sum(dim=0), p.sum(dim=0)
    if global_batch:
        sums, rows = global_sums(torch.cat([a_sum, p_sum]), rows.reshape(1))
        a_sum, p_sum, rows = sums[:e], sums[e:], rows[0]
    rows = rows.clamp_min(1)
    f = a_sum / a_sum.sum().clamp_min(1e-9) if normalise else a_sum / rows
    return e * (f * (p_sum / rows)).sum()
