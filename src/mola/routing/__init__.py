"""Routing: routers (which experts a token uses, with which gate) and the auxiliary losses.

One module per router family, registered in :data:`ROUTERS` by name:

* :mod:`~mola.routing.simple`: ``topk`` (MoLA), ``switch``, ``topp``, ``soft``;
* :mod:`~mola.routing.sparsegen`: ``ldmole`` (LD-MoLE);
* :mod:`~mola.routing.dynmole`: ``dynmole`` (DynMoLE);
* :mod:`~mola.routing.adamole`: ``adamole`` (AdaMoLE);
* :mod:`~mola.routing.relu`: ``relu`` (ReMoE);
* :mod:`~mola.routing.loramoe`: ``loramoe`` (LoRAMoE's localized balancing).

:mod:`~mola.routing.base` defines the interface (:class:`Router`, :class:`Routing`) and the
shared selection helpers, :mod:`~mola.routing.losses` the balance and z losses, and
:mod:`~mola.routing.scope` the block-level scope (one router shared by a sub-block's modules).
"""

# the registration order is the order routers are listed in
# isort: off
from mola.routing import simple  # noqa: F401
from mola.routing import sparsegen, dynmole, adamole, relu, loramoe  # noqa: F401

# isort: on
from mola.routing.base import REDUCTIONS, Router, Routing
from mola.routing.losses import load_balancing_loss, router_z_loss
from mola.routing.registry import ROUTERS, build_router, router_class

__all__ = [
    "REDUCTIONS",
    "ROUTERS",
    "Router",
    "Routing",
    "build_router",
    "load_balancing_loss",
    "router_class",
    "router_z_loss",
]
