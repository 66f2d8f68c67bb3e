"""``MolaConfig``: every knob of a MoLA adapter, with a JSON round trip."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mola.core.allocation import LayerSpec, allocate
from mola.core.patterns import PATTERN_KEYS, ModuleSpec, check_patterns, match, per_layer
from mola.experts.registry import STRUCTURES, check_structure
from mola.routing import ROUTERS, build_router

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Keys that adapter_config.json carries beside the config fields.
META_KEYS = frozenset({"base_model_name_or_path", "base_model_class", "allocation", "mola_version"})


@dataclass
class MolaConfig:
    """Configuration of a layer-wise Mixture of LoRA Experts.

    ``num_experts``, ``top_k`` and ``r`` are *layer specs* (see :func:`mola.allocate`): an int, one
    value per decoder layer, a shorter list of group values, a string ``"2,4,6,8"`` or a named shape
    (``square``, ``triangle``, ``inverted-triangle``, ``hourglass``).
    """

    target_modules: list[str] | str = field(
        default_factory=lambda: list(LLAMA_TARGETS),
        metadata={"help": "module names to adapt (last name component), or one full-match regex"},
    )
    num_experts: LayerSpec = field(
        default="inverted-triangle", metadata={"help": "experts per decoder layer (layer spec)"}
    )
    r: LayerSpec = field(default=8, metadata={"help": "LoRA rank of each expert (layer spec)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "scale is lora_alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    top_k: LayerSpec | None = field(
        default=2, metadata={"help": "experts used per token (layer spec); cap for 'topp'"}
    )
    router: str = field(default="topk", metadata={"help": f"one of {', '.join(ROUTERS)}"})
    top_p: float = field(default=0.5, metadata={"help": "cumulative probability for 'topp'"})
    aux_loss_coef: float = field(default=0.001, metadata={"help": "load-balancing loss weight"})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "router z-loss weight"})
    # expert structures and per-module allocation (see mola.experts and mola.core.patterns)
    experts_structure: str = field(
        default="stacked", metadata={"help": f"expert structure: {', '.join(STRUCTURES)}"}
    )
    module_patterns: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "module-name regex -> overrides (num_experts, top_k, r, lora_alpha, "
            "router, experts_structure; each a layer spec); the first match wins"
        },
    )
    a_dropout: float = field(
        default=0.0, metadata={"help": "MoSLD: dropout on the entries of the shared A (training)"}
    )
    fly_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "FlyLoRA: share of nonzero entries per row of the frozen A "
            "(None: top_k / r, as the authors' code)"
        },
    )
    balance_bias_rate: float = field(
        default=0.001,
        metadata={"help": "FlyLoRA/SMoRA: step of the loss-free balancing bias (0: off)"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = [str(t) for t in self.target_modules]
            if not self.target_modules:
                raise ValueError("target_modules: empty; name at least one module, e.g. q_proj")
        elif not isinstance(self.target_modules, str):
            raise ValueError("target_modules: give a list of module names or one regex string")
        if isinstance(self.num_experts, tuple):
            self.num_experts = list(self.num_experts)
        if self.router not in ROUTERS:
            raise ValueError(
                f"router: unknown router {self.router!r}; choose from {', '.join(ROUTERS)}"
            )
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ValueError("aux_loss_coef / router_z_loss_coef: must be >= 0")
        check_structure(self.experts_structure)
        self.module_patterns = check_patterns(self.module_patterns)
        if not 0.0 <= self.a_dropout < 1.0:
            raise ValueError(f"a_dropout: must be in [0, 1), got {self.a_dropout}")
        if self.fly_sparsity is not None and not 0.0 < self.fly_sparsity <= 1.0:
            raise ValueError(f"fly_sparsity: must be in (0, 1], got {self.fly_sparsity}")
        if self.balance_bias_rate < 0:
            raise ValueError(f"balance_bias_rate: must be >= 0, got {self.balance_bias_rate}")

    def resolve(self, num_layers: int) -> dict[str, list[Any]]:
        """Per-layer ``num_experts``, ``top_k`` and ``r`` for a model with ``num_layers`` layers.

        Raises:
            ValueError: a spec is malformed or a layer's ``top_k`` exceeds its expert count.
        """
        ranks = allocate(self.r, num_layers, field="r")
        if check_structure(self.experts_structure).rank_experts:
            experts = list(ranks)  # every rank is an expert
        else:
            experts = allocate(self.num_experts, num_layers, field="num_experts")
        if self.top_k is None:
            top_k: list[int | None] = [None] * num_layers
        else:
            top_k = list(allocate(self.top_k, num_layers, field="top_k"))
        for layer, (e, k) in enumerate(zip(experts, top_k, strict=True)):
            try:
                build_router(self.router, e, k, self.top_p)
            except ValueError as err:
                raise ValueError(f"decoder layer {layer}: {err}") from None
        return {"num_experts": experts, "top_k": top_k, "r": ranks}

    def module_spec(self, name: str, layer_idx: int, num_layers: int) -> ModuleSpec:
        """The resolved settings of the module ``name`` in decoder layer ``layer_idx``.

        ``module_patterns`` overrides apply first (the first matching regex wins); for the
        rank-wise structures (``rankwise``, ``flylora``) every rank is an expert, so
        ``num_experts`` is the layer's rank ``r``.

        Raises:
            ValueError: an override is malformed, or the router cannot take the top-k.
        """
        found = match(self.module_patterns, name)
        overrides = found[1] if found else {}
        where = f"module_patterns[{found[0]!r}]" if found else "config"
        values: dict[str, Any] = {}
        for key in reversed(PATTERN_KEYS):  # the structure first: it decides num_experts
            if key == "num_experts" and check_structure(values["experts_structure"]).rank_experts:
                values[key] = values["r"]
                continue
            spec = overrides.get(key, getattr(self, key))
            try:
                values[key] = per_layer(spec, num_layers, key)[layer_idx]
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        try:
            build_router(values["router"], values["num_experts"], values["top_k"], self.top_p)
        except ValueError as err:
            raise ValueError(f"{name} ({where}): {err}") from None
        return ModuleSpec(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MolaConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - META_KEYS)
        if unknown:
            raise ValueError(f"MolaConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MolaConfig:
        """Read a config JSON (or a saved adapter's ``adapter_config.json``, or its directory)."""
        if os.path.isdir(path):
            path = os.path.join(path, "adapter_config.json")
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))
