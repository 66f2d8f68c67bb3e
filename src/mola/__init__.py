"""mola: layer-wise Mixture of LoRA Experts (MoLA) for Hugging Face causal LMs."""

__version__ = "0.1.0"

from mola.core.allocation import SHAPES, allocate  # noqa: E402
from mola.core.config import MolaConfig  # noqa: E402
from mola.core.layer import MolaLinear  # noqa: E402
from mola.core.model import MolaModel, get_mola_model  # noqa: E402
from mola.routing import ROUTERS, build_router, load_balancing_loss, router_z_loss  # noqa: E402

__all__ = [
    "ROUTERS",
    "SHAPES",
    "MolaConfig",
    "MolaLinear",
    "MolaModel",
    "allocate",
    "build_router",
    "get_mola_model",
    "load_balancing_loss",
    "router_z_loss",
]
