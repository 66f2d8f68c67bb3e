"""Per-module allocation: ``module_patterns`` maps a module-name regex to overrides.

Like PEFT's ``rank_pattern`` / ``alpha_pattern``, but for every knob of a MoE-LoRA layer::

    module_patterns = {
        r"self_attn\\.\\w+_proj": {"num_experts": 1, "router": "none"},   # MixLoRA: plain LoRA
        r"mlp\\.down_proj": {"num_experts": "2,4,6,8", "r": [4, 8]},
    }

A pattern matches a module when it matches the end of the module's qualified name at a ``.``
boundary (``re.fullmatch(r"(.*\\.)?(?:PATTERN)", name)``), so ``q_proj`` matches
``model.layers.3.self_attn.q_proj``. The first matching pattern, in the mapping's order, wins;
its keys replace the config's values for that module, the others keep the config's.

Every override is still a *layer spec*: ``num_experts``, ``top_k`` and ``r`` take anything
:func:`mola.allocate` takes; ``lora_alpha`` a number or a list of numbers; ``router`` and
``experts_structure`` a name or a list of names; a list of ``G < num_layers`` values is split into
contiguous groups like :func:`mola.allocate` does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mola.core.allocation import allocate, split_groups

# overridable keys and how each is resolved per layer
INT_KEYS = ("num_experts", "top_k", "r")
PATTERN_KEYS = (*INT_KEYS, "lora_alpha", "router", "experts_structure")


@dataclass(frozen=True)
class ModuleSpec:
    """What one adapted module gets: its experts, top-k, rank, alpha, router and structure."""

    num_experts: int
    top_k: int | None
    r: int
    lora_alpha: float
    router: str
    experts_structure: str
    expert_ranks: tuple[int, ...] | None = None  # per expert (module_allocation), <= r


def check_patterns(patterns: Any) -> dict[str, dict[str, Any]]:
    """Validate ``module_patterns``: a mapping of compilable regexes to dicts of known keys.

    Raises:
        ValueError: not a mapping, a bad regex, or an unknown key (all named in the message).
    """
    if patterns is None:
        return {}
    if not isinstance(patterns, Mapping):
        raise ValueError("module_patterns: expected a mapping of module-name regex -> overrides")
    out: dict[str, dict[str, Any]] = {}
    for pattern, overrides in patterns.items():
        try:
            re.compile(str(pattern))
        except re.error as err:
            raise ValueError(f"module_patterns: bad regex {pattern!r} ({err})") from None
        if not isinstance(overrides, Mapping):
            raise ValueError(f"module_patterns[{pattern!r}]: expected a mapping of overrides")
        unknown = sorted(set(overrides) - set(PATTERN_KEYS))
        if unknown:
            raise ValueError(
                f"module_patterns[{pattern!r}]: unknown key(s) {unknown}; "
                f"known: {', '.join(PATTERN_KEYS)}"
            )
        out[str(pattern)] = {k: _plain(v) for k, v in overrides.items()}
    return out


def _plain(value: Any) -> Any:
    """Tuples to lists, so a config round-trips through JSON unchanged."""
    return list(value) if isinstance(value, tuple) else value


def match(patterns: Mapping[str, Mapping[str, Any]], name: str) -> tuple[str, dict] | None:
    """The first ``(pattern, overrides)`` whose regex matches the end of ``name``, or ``None``."""
    for pattern, overrides in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
            return pattern, dict(overrides)
    return None


def per_layer(spec: Any, num_layers: int, field: str) -> list[Any]:
    """One value per decoder layer for any override key (see the module docstring)."""
    if field in INT_KEYS:
        if spec is None and field == "top_k":
            return [None] * num_layers
        return allocate(spec, num_layers, field=field)
    if isinstance(spec, str) or not isinstance(spec, Sequence):
        values = [spec]
    else:
        values = list(spec)
    if field == "lora_alpha":
        if not values or not all(_is_number(v) and v > 0 for v in values):
            raise ValueError(f"{field}: expected a number > 0 or a list of them, got {spec!r}")
        values = [float(v) for v in values]
    elif not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{field}: expected a name or a list of names, got {spec!r}")
    return split_groups(values, num_layers, field)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
