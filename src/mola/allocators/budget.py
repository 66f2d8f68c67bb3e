"""Budget arithmetic: turn per-layer scores into expert counts and ranks that meet a budget exactly.

A layer ``l`` whose adapted modules have input sizes ``d_in`` and output sizes ``d_out`` costs,
with ``E_l`` experts of rank ``r_l``::

    params_l = E_l * (r_l * sum(d_in + d_out) + sum(d_in))     # lora_A + lora_B + router

Two kinds of budget (``--by``):

* ``experts``: the total ``sum E_l`` equals the budget exactly;
* ``params``: the trainable parameters ``sum params_l`` do not exceed the budget, and no single
  layer's rank can grow by one more without exceeding it (so the gap is under one rank unit,
  ``E_l * sum(d_in + d_out)`` of the cheapest layer).

Always: every layer keeps at least one expert and at least ``top_k`` experts, and rank >= 1.
A strategy's per-layer weights say how much a layer wants *above* that floor: the budget left
after the floors is shared in proportion to them (largest-remainder rounding), so a layer with
no evidence for more keeps the floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BUDGET_KINDS = ("experts", "params")


@dataclass(frozen=True)
class LayerCost:
    """The parameter cost of one decoder layer per expert: ``rank_unit`` per rank, ``router``."""

    rank_unit: int  # sum over the layer's adapted modules of d_in + d_out
    router: int  # sum over the layer's adapted modules of d_in

    def params(self, experts: int, rank: int) -> int:
        return experts * (rank * self.rank_unit + self.router)


def trainable_params(
    num_experts: Sequence[int], ranks: Sequence[int], costs: Sequence[LayerCost]
) -> int:
    """Trainable parameters of the allocation (``lora_A``, ``lora_B`` and routers)."""
    return sum(c.params(e, r) for e, r, c in zip(num_experts, ranks, costs, strict=True))


def _clean(weights: Sequence[float]) -> list[float]:
    out = [float(w) if math.isfinite(float(w)) and float(w) > 0 else 0.0 for w in weights]
    return out if sum(out) > 0 else [1.0] * len(out)


def apportion(weights: Sequence[float], total: int, minimum: Sequence[int]) -> list[int]:
    """Each layer's ``minimum`` plus a share of the rest in proportion to ``weights``; sums to
    ``total``.

    The weights say how much a layer wants *above* its floor (a layer with weight 0 keeps its
    minimum). Shares are rounded by largest remainder (ties: the lower layer). Non-positive or
    non-finite weights count as 0; all-zero weights share the rest uniformly.

    Raises:
        ValueError: ``total`` is below ``sum(minimum)``.
    """
    if len(weights) != len(minimum):
        raise ValueError("apportion: weights and minimum differ in length")
    if total < sum(minimum):
        raise ValueError(f"total {total} is below the minimum {sum(minimum)} ({list(minimum)})")
    w = _clean(weights)
    rest = total - sum(minimum)
    shares = [rest * wi / sum(w) for wi in w]
    out = [m + math.floor(sh) for m, sh in zip(minimum, shares, strict=True)]
    order = sorted(range(len(w)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def min_experts(top_k: Sequence[int | None]) -> list[int]:
    """The fewest experts each layer may have: 1, or its ``top_k``."""
    return [max(1, k or 1) for k in top_k]


def fit_experts(weights: Sequence[float], budget: int, top_k: Sequence[int | None]) -> list[int]:
    """Expert counts proportional to ``weights`` summing exactly to ``budget``.

    Raises:
        ValueError: the budget cannot give every layer ``max(1, top_k)`` experts.
    """
    floor = min_experts(top_k)
    if budget < sum(floor):
        raise ValueError(
            f"--budget: {budget} experts is too few; {len(floor)} layers need at least "
            f"{sum(floor)} (each layer >= 1 expert and >= top_k)"
        )
    return apportion(weights, budget, floor)


def fit_ranks(
    weights: Sequence[float], num_experts: Sequence[int], costs: Sequence[LayerCost], budget: int
) -> list[int]:
    """Ranks ``1 + share`` (shares proportional to ``weights``) filling a parameter ``budget``.

    With the experts fixed, ``r_l = 1 + floor(s * w_l)`` for the largest scale ``s`` that fits,
    then one rank at a time goes to the layer furthest below its share while any layer's next
    rank still fits.
    On return ``params <= budget < params + min_l E_l * rank_unit_l``.

    Raises:
        ValueError: not even rank 1 everywhere fits in ``budget``.
    """
    w = _clean(weights)
    units = [e * c.rank_unit for e, c in zip(num_experts, costs, strict=True)]
    fixed = sum(e * c.router for e, c in zip(num_experts, costs, strict=True))
    room = budget - fixed

    def cost(scale: float) -> int:
        return sum((1 + math.floor(scale * wi)) * u for wi, u in zip(w, units, strict=True))

    if room < sum(units):
        need = fixed + sum(units)
        raise ValueError(
            f"--budget: {budget:,d} trainable parameters is too few for {sum(num_experts)} "
            f"experts at rank 1 ({need:,d} needed)"
        )
    lo, hi = 0.0, room / sum(wi * u for wi, u in zip(w, units, strict=True)) * 2 + 1
    for _ in range(100):  # largest scale whose floor-ranks fit
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= room else (lo, mid)
    ranks = [1 + math.floor(lo * wi) for wi in w]
    left = room - sum(r * u for r, u in zip(ranks, units, strict=True))
    while True:
        fits = [i for i, u in enumerate(units) if u <= left]
        if not fits:
            break
        i = max(fits, key=lambda j: (1 + lo * w[j] - ranks[j], -j))
        ranks[i] += 1
        left -= units[i]
    return ranks


def fit_params(
    expert_weights: Sequence[float],
    rank_weights: Sequence[float],
    budget: int,
    costs: Sequence[LayerCost],
    top_k: Sequence[int | None],
    total_experts: int,
) -> tuple[list[int], list[int]]:
    """Experts and ranks meeting a trainable-parameter ``budget`` (see :func:`fit_ranks`).

    The experts get ``total_experts`` (the strategy's own count) shaped by ``expert_weights``,
    fewer if even rank 1 would not fit; the ranks then fill the budget shaped by
    ``rank_weights``.

    Raises:
        ValueError: the budget does not fit the smallest allocation (min experts, rank 1).
    """
    floor = min_experts(top_k)
    total = max(total_experts, sum(floor))
    while True:
        experts = apportion(expert_weights, total, floor)
        if trainable_params(experts, [1] * len(experts), costs) <= budget:
            return experts, fit_ranks(rank_weights, experts, costs, budget)
        if total == sum(floor):
            need = trainable_params(experts, [1] * len(experts), costs)
            raise ValueError(
                f"--budget: {budget:,d} trainable parameters is too few; the smallest allocation "
                f"({total} experts, rank 1) needs {need:,d}"
            )
        total -= 1


def experts_at_rank(
    weights: Sequence[float],
    budget: int,
    costs: Sequence[LayerCost],
    top_k: Sequence[int | None],
    rank: int,
) -> int:
    """The most experts (shaped by ``weights``) that fit ``budget`` parameters at ``rank``.

    At least the minimum (``max(1, top_k)`` per layer), even if that does not fit.
    """
    floor = min_experts(top_k)
    total = sum(floor)
    ranks = [rank] * len(floor)
    while trainable_params(apportion(weights, total + 1, floor), ranks, costs) <= budget:
        total += 1
    return total


def fit_budget(
    by: str,
    budget: int,
    expert_weights: Sequence[float],
    rank_weights: Sequence[float],
    costs: Sequence[LayerCost],
    top_k: Sequence[int | None],
    *,
    ranks: Sequence[int],
    total_experts: int,
) -> tuple[list[int], list[int]]:
    """``(num_experts, r)`` per layer for a budget ``by`` experts or params.

    By experts, the ranks are the strategy's own ``ranks``; by params, ``total_experts`` is the
    strategy's own expert count (see :func:`fit_params`).
    """
    if by not in BUDGET_KINDS:
        raise ValueError(f"--by: unknown {by!r}; choose from {', '.join(BUDGET_KINDS)}")
    if budget < 1:
        raise ValueError(f"--budget: must be >= 1, got {budget}")
    if by == "experts":
        return fit_experts(expert_weights, budget, top_k), [max(1, int(r)) for r in ranks]
    return fit_params(expert_weights, rank_weights, budget, costs, top_k, total_experts)
