"""The router registry: name -> class, read by the config, the CLI and ``mola methods``."""

from __future__ import annotations

from typing import Any

import torch

from mola.routing.base import Router

ROUTERS: dict[str, type[Router]] = {}
"""Every router by name, in registration order."""


def register(cls: type[Router]) -> type[Router]:
    """Class decorator: add a router to :data:`ROUTERS` under ``cls.name``."""
    if cls.name in ROUTERS and ROUTERS[cls.name] is not cls:
        raise ValueError(f"router name {cls.name!r} registered twice")
    ROUTERS[cls.name] = cls
    return cls


def router_class(name: str) -> type[Router]:
    """The class of router ``name`` (``ValueError`` naming the choices if unknown)."""
    if name not in ROUTERS:
        raise ValueError(f"router: unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    return ROUTERS[name]


def build_router(
    name: str,
    num_experts: int,
    top_k: int | None = None,
    top_p: float | None = None,
    in_features: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **options: Any,
) -> Router:
    """Make the router called ``name`` for a layer with ``num_experts`` experts.

    Without ``in_features`` the router has no parameters (it routes given logits); with it, it
    owns its weights. ``options`` are the router's own settings (``ROUTERS[name].option_names``);
    options it does not take are ignored, so a caller may pass every router setting it has.

    Raises:
        ValueError: unknown router name, or a ``top_k``/``top_p``/option it cannot use.
    """
    cls = router_class(name)
    if num_experts < 1:
        raise ValueError(f"num_experts: must be >= 1, got {num_experts}")
    if cls.uses_top_k and top_k is not None and not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k: {top_k} is not in 1..{num_experts} for a layer with {num_experts} experts; "
            f"lower top_k or raise num_experts"
        )
    if cls.requires_top_k and top_k is None:
        raise ValueError(f"top_k: the {name!r} router needs top_k (e.g. 2)")
    top_p = cls.default_top_p if top_p is None else top_p
    if name == "topp" and (top_p is None or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: the 'topp' router needs 0 < top_p <= 1, got {top_p}")
    own = {k: v for k, v in options.items() if k in cls.option_names}
    return cls(
        num_experts,
        top_k if cls.uses_top_k else None,
        top_p,
        in_features,
        dtype=dtype,
        device=device,
        **own,
    )
