"""``torch.compile`` of a mola model for inference, region by region.

Compiling the whole model traces every decoder layer into one graph (minutes of compiling on a
CPU, and a graph per sequence length unless shapes are dynamic). mola compiles *regions*
instead, each in place with ``nn.Module.compile``:

* a sub-block that holds adapted modules and does not touch the KV cache (a Llama ``mlp``) is
  compiled as a whole: the frozen projections, the adapters and what lies between fuse;
* in a sub-block that updates the KV cache (attention), each adapted module is compiled alone:
  the cache is a Python object whose per-layer state would give every layer its own graph.

Regions of the same shapes in different layers share one compiled graph (the parameters are
graph inputs), so the compile cost grows with the number of distinct layer shapes (the expert
counts of a layer-wise allocation), not with the depth. Shapes are dynamic (``dynamic=True``):
the batch and the sequence length, which change at every decoding step, do not recompile.

Under compilation the layer does not use its derived-weight cache
(:mod:`mola.core.cache`): the compiler sees the weights' derivation and fuses it.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

import torch
from torch import nn

from mola.core.layer import MolaLinear

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_position")
"""Parameters of a sub-block's ``forward`` that mean it reads or writes the KV cache."""


def touches_cache(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes a KV-cache argument (see :data:`CACHE_ARGUMENTS`)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return any(name in params for name in CACHE_ARGUMENTS)


def compile_regions(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`compile_model` compiles, in model order (see the module docstring)."""
    parents: dict[int, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            parents.setdefault(id(child), module)
    regions: dict[int, nn.Module] = {}
    for module in model.modules():
        if not isinstance(module, MolaLinear):
            continue
        parent = parents.get(id(module))
        whole = parent is not None and parent is not model and not touches_cache(parent)
        region = parent if whole else module
        regions.setdefault(id(region), region)
    return list(regions.values())


COMPILE_HELP = (
    "torch.compile the adapted regions (each MLP, each attention projection) first, with "
    "BACKEND (default inductor). Costs minutes of compiling at the first batch and again at the "
    "first decoding step (default model, loaded 2-core CPU: 2.2 min + 6.7 min cold, 0.8 + 0.9 "
    "min with torch's kernel cache warm) and does not pay off on a CPU (forward 4x128 1.05x, "
    "batch-1 decoding 1.23x the eager time); see docs/inference.md"
)
"""The ``--compile`` flag's help (``mola eval``, ``mola generate``)."""


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """``--compile [BACKEND]`` (see :data:`COMPILE_HELP`)."""
    parser.add_argument(
        "--compile", nargs="?", const="inductor", metavar="BACKEND", help=COMPILE_HELP
    )


def compile_for_cli(model: nn.Module, backend: str | None) -> None:
    """Compile ``model`` for ``--compile BACKEND`` (nothing when ``backend`` is ``None``).

    Raises:
        ValueError: an unknown backend, or a model without adapted modules.
    """
    if backend is None:
        return
    if backend not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(
            f"--compile: unknown backend {backend!r}; e.g. inductor, aot_eager, eager "
            "(torch.compiler.list_backends() lists them)"
        )
    if not compile_regions(model):
        raise ValueError("--compile: the model has no adapted modules to compile (give --adapter)")
    count = compile_model(model, backend=backend)
    print(f"compiling {count} regions with {backend} at their first call", file=sys.stderr)


def compile_model(model: nn.Module, *, dynamic: bool = True, **options: Any) -> int:
    """Compile ``model``'s adapter-carrying regions in place; returns how many.

    Nothing is compiled until the first call, which then takes the compile time (see the
    docs/inference.md). ``options`` go to ``torch.compile`` (``mode``, ``backend``).
    Each distinct region shape compiles twice (a general length, and one token, which dynamo
    specialises), all regions of one class share one code object, so dynamo's per-function
    recompile limit is raised to twice the number of regions.
    """
    regions = compile_regions(model)
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * len(regions))
    for region in regions:
        region.compile(dynamic=dynamic, **options)
    return len(regions)
