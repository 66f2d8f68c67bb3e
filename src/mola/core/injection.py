"""Find a model's decoder blocks and put a :class:`MolaLinear` in place of each targeted layer."""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from mola.core.collect import RouterLogitsStore
from mola.core.config import MolaConfig
from mola.core.layer import MolaLinear, adapter_dtype, features, is_supported
from mola.routing import build_router
from mola.routing.scope import SharedRouting


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks, found from its structure, and its qualified name.

    Candidates are ``nn.ModuleList``\\ s of identical blocks. When the config gives a layer count
    (the text config's ``num_hidden_layers``), lists of that length are preferred; among the rest
    the one holding the most parameters wins (the decoder stack, not a vision tower's).

    Raises:
        ValueError: the model has no such list.
    """
    expected = None
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        expected = getattr(text, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and len({type(m) for m in mod}) == 1
        and not is_supported(mod[0])
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: found no list of decoder blocks to adapt")
    if expected is not None and any(len(m) == expected for _, m in candidates):
        candidates = [c for c in candidates if len(c[1]) == expected]
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def _targeted(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name.rsplit(".", 1)[-1] in targets


def inject(model: nn.Module, config: MolaConfig, store: RouterLogitsStore) -> dict[str, list]:
    """Replace every targeted linear layer inside the decoder blocks with a ``MolaLinear``.

    Each adapted layer gets the allocation (experts, top-k, rank) of its decoder layer and a
    reference to ``store``. Only modules inside the decoder blocks are adapted.

    Returns:
        The resolved allocation: ``{"num_experts": [...], "top_k": [...], "r": [...]}``.

    Raises:
        ValueError: a name in ``target_modules`` matches no linear layer, a regex matches
            nothing (the message lists what exists), or a matched module is not a linear layer.
    """
    prefix, blocks = find_decoder_layers(model)
    allocation = config.resolve(len(blocks))
    check_target_modules(model, config.target_modules)
    options = {**config.router_options(), "share": {}}  # "share": parts shared by routers
    found = 0
    for idx, block in enumerate(blocks):
        scopes: dict[str, SharedRouting] = {}
        for name, module in list(block.named_modules()):
            full = f"{prefix}.{idx}.{name}" if prefix else f"{idx}.{name}"
            if not name or not _targeted(full, config.target_modules):
                continue
            if not is_supported(module):
                raise ValueError(
                    f"target_modules: {full} is a {type(module).__name__}, not a linear layer; "
                    f"mola adapts nn.Linear and Conv1D, so remove it from target_modules"
                )
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            spec = config.module_spec(full, idx, len(blocks))
            shared = None
            # block scope: the sub-block's modules share one router, built from the first one's
            # settings; a module that module_patterns make a single expert in a routed layer is a
            # plain LoRA and routes nothing (MixLoRA's attention)
            plain = spec.num_experts == 1 and allocation["num_experts"][idx] > 1
            if config.router_scope == "block" and not plain:
                shared = scopes.get(parent_name)
                if shared is None:
                    shared = scopes[parent_name] = _share_router(
                        parent,
                        full.rpartition(".")[0],
                        module,
                        spec.router,
                        spec.num_experts,
                        spec.top_k,
                        config.top_p,
                        {**config.router_options(spec.router), "share": options["share"]},
                    )
            layer = MolaLinear(
                module,
                spec.num_experts,
                spec.r,
                spec.lora_alpha,
                config.lora_dropout,
                spec.top_k,
                router=spec.router,
                top_p=config.top_p,
                router_options={**config.router_options(spec.router), "share": options["share"]},
                shared=shared,
                experts_structure=spec.experts_structure,
                structure_options=dataclasses.replace(
                    config.structure_options(spec.top_k), expert_ranks=spec.expert_ranks
                ),
            )
            layer.layer_idx, layer.module_name, layer.store = idx, full, store
            setattr(parent, child, layer)
            found += 1
    if not found:
        raise ValueError(
            f"target_modules: {config.target_modules!r} matches no module in the decoder layers; "
            f"linear modules there: {', '.join(_linear_names(blocks))}"
        )
    return allocation


def _linear_names(blocks: nn.ModuleList) -> list[str]:
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in blocks[0].named_modules() if n and is_supported(m)}
    )


def check_target_modules(model: nn.Module, targets: list[str] | str) -> None:
    """Every name in ``targets`` must name at least one module of the decoder blocks (that it
    is a linear layer, :func:`inject` checks).

    Raises:
        ValueError: a name matches no module (the message lists the linear layers that exist).
    """
    if isinstance(targets, str):
        return  # one regex: inject() requires it to match something
    blocks = find_decoder_layers(model)[1]
    present = {n.rsplit(".", 1)[-1] for block in blocks for n, _ in block.named_modules() if n}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(
            f"target_modules: {missing} matches no module in the decoder layers; "
            f"linear modules there: {', '.join(_linear_names(blocks))}"
        )


def _share_router(
    parent: nn.Module,
    name: str,
    first: nn.Module,
    router_name: str,
    experts: int,
    top_k: int | None,
    top_p: float | None,
    options: dict,
) -> SharedRouting:
    """Put one router on ``parent`` (as ``parent.router``), fed by ``parent``'s input."""
    if hasattr(parent, "router"):
        raise ValueError(
            f"router_scope: {name} already has a 'router' attribute; use router_scope: module"
        )
    in_features = _input_features(parent)
    weight = first.weight
    router = build_router(
        router_name,
        experts,
        top_k,
        top_p,
        in_features,
        dtype=adapter_dtype(weight.dtype),
        device=weight.device,
        **options,
    )
    parent.router = router
    return SharedRouting(parent, router, name)


def _input_features(parent: nn.Module) -> int:
    """The width of ``parent``'s input: that of its first linear module (q_proj, gate_proj)."""
    first = next(m for m in parent.modules() if m is not parent and is_supported(m))
    return features(first)[0]
