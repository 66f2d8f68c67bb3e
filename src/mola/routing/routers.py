"""The old import path of the router classes (kept so ``mola.routing.routers`` still works)."""

from mola.routing.base import Router
from mola.routing.registry import ROUTERS, build_router
from mola.routing.simple import SoftRouter, SwitchRouter, TopKRouter, TopPRouter

__all__ = [
    "ROUTERS",
    "Router",
    "SoftRouter",
    "SwitchRouter",
    "TopKRouter",
    "TopPRouter",
    "build_router",
]
