"""Routing: routers (which experts a token uses, with which gate) and the auxiliary losses."""

from mola.routing.losses import load_balancing_loss, router_z_loss
from mola.routing.routers import ROUTERS, Router, build_router

__all__ = ["ROUTERS", "Router", "build_router", "load_balancing_loss", "router_z_loss"]
