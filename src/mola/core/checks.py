"""Value checks shared by the config and the command line: numbers within bounds, top-k against
the expert counts, per-module allocations. Each raises one ``ValueError`` naming the option."""

from __future__ import annotations

import math
from typing import Any

from mola.routing import ROUTERS


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within the bounds, or a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    wanted = (
        f"in {lo}, {hi}"
        if low is not None and high is not None
        else (f"> {low:g}" if low_open else f">= {low:g}")
        if low is not None
        else (f"< {high:g}" if high_open else f"<= {high:g}")
    )
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        raise ValueError(f"{name}: must be a finite number {wanted}, got {value}")
    return float(value)


def check_top_k(
    experts: list[int],
    top_k: list[int],
    router: str,
    names: tuple[str, str] = ("num_experts", "top_k"),
) -> None:
    """Each layer's top-k must not exceed its expert count (for routers that use top-k).

    Only the cases decidable without the model: one top-k value for all layers, or as many
    top-k values as expert values (group by group).
    """
    if not ROUTERS[router].uses_top_k:
        return
    if len(top_k) == 1:
        pairs = [(e, top_k[0]) for e in experts]
    elif len(top_k) == len(experts):
        pairs = list(zip(experts, top_k, strict=True))
    else:
        return
    for e, k in pairs:
        if k > e and e > 1:  # one expert is a plain LoRA: no router, top_k unused
            raise ValueError(
                f"{names[1]}: {k} is more than the {e} experts of a layer ({names[0]} {experts}); "
                f"lower {names[1]} or raise {names[0]}"
            )


def check_module_allocation(value: Any) -> dict[str, dict[str, Any]]:
    """``module_allocation``: module name -> ``{num_experts: E, expert_ranks: [E ranks >= 1]}``."""
    if not isinstance(value, dict):
        raise ValueError("module_allocation: expected a mapping of module name -> shape")
    out: dict[str, dict[str, Any]] = {}
    for name, shape in value.items():
        ranks = shape.get("expert_ranks") if isinstance(shape, dict) else None
        num = shape.get("num_experts") if isinstance(shape, dict) else None
        ok = isinstance(num, int) and num >= 1 and isinstance(ranks, (list, tuple))
        if not ok or len(ranks) != num or not all(isinstance(q, int) and q >= 1 for q in ranks):
            raise ValueError(
                f"module_allocation[{name!r}]: needs num_experts (>= 1) and expert_ranks "
                f"(one int >= 1 per expert), got {shape!r}"
            )
        out[str(name)] = {"num_experts": num, "expert_ranks": [int(q) for q in ranks]}
    return out
