"""``MolaConfig``: every knob of a MoLA adapter, with a JSON round trip."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from mola import __version__
from mola.core.allocation import LayerSpec, allocate, check_spec
from mola.core.checks import check_module_allocation, check_number, check_top_k
from mola.core.patterns import PATTERN_KEYS, ModuleSpec, check_patterns, match, per_layer
from mola.experts.base import StructureOptions
from mola.experts.registry import STRUCTURES, check_structure
from mola.routing import REDUCTIONS, ROUTERS, build_router, router_class
from mola.routing.scope import SCOPES
from mola.utils.io import write_json

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIG_NAME = "adapter_config.json"

# Keys that adapter_config.json carries beside the config fields.
META_KEYS = frozenset(
    {"base_model_name_or_path", "revision", "base_model_class", "allocation", "mola_version"}
)


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
    top_p: float | None = field(
        default=None,
        metadata={"help": "cumulative probability (topp, dynmole); None: the router's (0.5, 0.75)"},
    )
    aux_loss_coef: float = field(default=0.001, metadata={"help": "load-balancing loss weight"})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "router z-loss weight"})
    aux_loss_reduction: str | None = field(
        default=None,
        metadata={
            "help": "how auxiliary losses add up over modules and layers: "
            f"{', '.join(REDUCTIONS)} (None: the router's own, its authors' choice)"
        },
    )
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
    module_allocation: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "per-module shapes (mola allocate --granularity module): qualified module "
            "name -> {num_experts, expert_ranks}; replaces the layer's values there"
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
    balance_bias_rate: float | None = field(
        default=None,
        metadata={
            "help": "FlyLoRA/SMoRA: step of the loss-free balancing bias (0: off; None: the "
            "authors', 1e-3 FlyLoRA, 1e-5 SMoRA)"
        },
    )
    smora_gating: str = field(
        default="sigmoid",
        metadata={
            "help": "SMoRA: sigmoid (the authors' biased scores x k, alpha / k) or softmax "
            "(loss-free balancing gates, alpha / r)"
        },
    )
    # routers (issue 9): scope and the routers' own settings; each loss weight is <loss>_coef
    router_scope: str = field(
        default="module",
        metadata={"help": "module: a router per adapted module; block: one per sub-block"},
    )
    sparsity_loss_coef: float = field(
        default=0.0, metadata={"help": "ldmole: weight of the analytical sparsity loss"}
    )
    ldmole_hidden: int | None = field(
        default=None,
        metadata={
            "help": "ldmole: width of the lambda MLP (None: the authors' by model size, "
            "128 below 1.5B parameters, 256 below 6B, else 512)"
        },
    )
    ldmole_share: bool = field(
        default=True, metadata={"help": "ldmole: one lambda MLP shared by all modules"}
    )
    entropy_threshold: float = field(
        default=0.9, metadata={"help": "dynmole: Tsallis entropy above which all experts run"}
    )
    entropy_index: float = field(default=1.1, metadata={"help": "dynmole: Tsallis index q"})
    entropy_eps: float = field(default=1e-5, metadata={"help": "dynmole: entropy epsilon"})
    entropy_loss_coef: float = field(
        default=0.01, metadata={"help": "dynmole: weight of the Tsallis entropy loss (authors')"}
    )
    max_threshold: float | None = field(
        default=None, metadata={"help": "adamole: threshold cap (default 1 / num_experts)"}
    )
    l1_loss_coef: float = field(
        default=1e-8, metadata={"help": "relu: start weight of the L1 loss (ReMoE's 1e-8)"}
    )
    l1_loss_alpha: float = field(
        default=1.2, metadata={"help": "relu: ReMoE's per-step factor on l1_loss_coef (1: fixed)"}
    )
    lbc_groups: int = field(default=2, metadata={"help": "loramoe: expert groups (data types)"})
    lbc_delta: float = field(default=0.1, metadata={"help": "loramoe: localized balancing delta"})
    lbc_loss_coef: float = field(
        default=0.0, metadata={"help": "loramoe: weight of the localized balancing loss"}
    )

    _loading: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = [str(t).strip() for t in self.target_modules]
            if not self.target_modules:
                raise ValueError("target_modules: empty; name at least one module, e.g. q_proj")
            if "" in self.target_modules:
                raise ValueError(f"target_modules: empty name in {self.target_modules}")
        elif not isinstance(self.target_modules, str) or not self.target_modules.strip():
            raise ValueError("target_modules: give a list of module names or one regex string")
        if isinstance(self.num_experts, tuple):
            self.num_experts = list(self.num_experts)
        if not isinstance(self.router, str) or self.router not in ROUTERS:
            raise ValueError(
                f"router: unknown router {self.router!r}; choose from {', '.join(ROUTERS)}"
            )
        experts = check_spec(self.num_experts, "num_experts")
        ranks = check_spec(self.r, "r")
        if check_structure(self.experts_structure).rank_experts:
            experts = ranks  # every rank is an expert
        if self.top_k is not None:
            check_top_k(experts, check_spec(self.top_k, "top_k"), self.router)
        check_number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if self.top_p is not None:
            check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_number("aux_loss_coef", self.aux_loss_coef, low=0.0)
        check_number("router_z_loss_coef", self.router_z_loss_coef, low=0.0)
        check_structure(self.experts_structure)
        self._check_reduction()
        self.module_patterns = check_patterns(self.module_patterns)
        self.module_allocation = check_module_allocation(self.module_allocation)
        if not 0.0 <= self.a_dropout < 1.0:
            raise ValueError(f"a_dropout: must be in [0, 1), got {self.a_dropout}")
        if self.fly_sparsity is not None and not 0.0 < self.fly_sparsity <= 1.0:
            raise ValueError(f"fly_sparsity: must be in (0, 1], got {self.fly_sparsity}")
        if self.smora_gating not in ("sigmoid", "softmax"):
            raise ValueError(f"smora_gating: 'sigmoid' or 'softmax', got {self.smora_gating!r}")
        if self.balance_bias_rate is not None and self.balance_bias_rate < 0:
            raise ValueError(f"balance_bias_rate: must be >= 0, got {self.balance_bias_rate}")
        for name in ("sparsity_loss_coef", "entropy_loss_coef", "l1_loss_coef", "lbc_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.l1_loss_alpha >= 1.0:
            raise ValueError(f"l1_loss_alpha: must be >= 1 (1: fixed), got {self.l1_loss_alpha}")
        self._check_adaptive_l1()
        if self.lbc_groups < 1 or not 0.0 <= self.lbc_delta < 1.0:
            raise ValueError("lbc_groups / lbc_delta: need lbc_groups >= 1 and 0 <= lbc_delta < 1")
        if self.router_scope not in SCOPES:
            raise ValueError(
                f"router_scope: unknown scope {self.router_scope!r}; "
                f"choose from {', '.join(SCOPES)}"
            )

    def _check_adaptive_l1(self) -> None:
        """ReMoE's adaptive L1 must be able to act: a nonzero start and a target ``k``."""
        routers = {self.router} | {
            str(v.get("router")) for v in self.module_patterns.values() if v.get("router")
        }
        if "relu" not in routers or self.l1_loss_alpha == 1.0 or MolaConfig._loading:
            return
        if self.l1_loss_coef == 0:
            raise ValueError(
                f"l1_loss_coef: 0 never changes under ReMoE's adaptive update (0 x "
                f"{self.l1_loss_alpha:g} = 0), so the L1 loss would never act; start at ReMoE's "
                "1e-8, or set l1_loss_alpha: 1 to keep a fixed weight"
            )
        if self.top_k is None:
            raise ValueError(
                "top_k: ReMoE's adaptive L1 steers the sparsity towards 1 - top_k / num_experts "
                "and has no target without top_k; give top_k (e.g. 1), or set l1_loss_alpha: 1 "
                "to keep a fixed weight"
            )

    def _check_reduction(self) -> None:
        value = self.aux_loss_reduction
        if value is None:
            return
        if value not in REDUCTIONS:
            raise ValueError(
                f"aux_loss_reduction: unknown {value!r}; choose from {', '.join(REDUCTIONS)}"
            )
        if value == "mixtral" and (self.top_k is None or router_class(self.router).dynamic):
            raise ValueError(
                "aux_loss_reduction: 'mixtral' counts f_i per top-k slot and needs a fixed top_k "
                f"router (topk, switch), not {self.router!r}"
            )

    def reduction(self, router: str) -> str:
        """How the losses of routers named ``router`` aggregate (config, else the router's)."""
        return self.aux_loss_reduction or router_class(router).aux_loss_reduction

    def router_options(self, router: str | None = None) -> dict[str, Any]:
        """The settings of ``router`` (default: the configured one; its ``option_names``)."""
        names = router_class(router or self.router).option_names
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def structure_options(self, top_k: int | None) -> StructureOptions:
        """The expert structure's own settings for a module with this ``top_k``."""
        return StructureOptions(
            top_k, self.a_dropout, self.fly_sparsity, self.balance_bias_rate, self.smora_gating
        )

    def loss_coef(self, loss: str) -> float:
        """The weight of auxiliary loss ``loss`` (the field ``<loss>_coef``; 0 if none)."""
        return float(getattr(self, f"{loss}_coef", 0.0))

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
            if e == 1:  # a plain LoRA: no router to check
                top_k[layer] = k and 1
                continue
            try:
                build_router(self.router, e, k, self.top_p, **self.router_options())
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
        if name in self.module_allocation:  # GuiLoMo's granularity: this module's own shape
            own = self.module_allocation[name]
            if values["experts_structure"] != "stacked":
                raise ValueError(f"module_allocation: {name} is not a stacked-experts module")
            ranks = tuple(own["expert_ranks"])
            values["num_experts"], values["r"] = own["num_experts"], max(ranks)
            if values["top_k"] is not None:
                values["top_k"] = min(values["top_k"], own["num_experts"])
            values["expert_ranks"] = ranks if len(set(ranks)) > 1 else None
        if values["num_experts"] == 1:  # a plain LoRA: no router to check
            values["top_k"] = values["top_k"] and 1
            return ModuleSpec(**values)
        try:
            build_router(
                values["router"],
                values["num_experts"],
                values["top_k"],
                self.top_p,
                **self.router_options(values["router"]),
            )
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
        cls._loading = True  # a saved adapter: training-only settings are not checked again
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        finally:
            cls._loading = False

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MolaConfig:
        """Read a config JSON (or a saved adapter's ``adapter_config.json``, or its directory)."""
        if os.path.isdir(path):
            return cls.from_dict(read_adapter_config(os.fspath(path)))  # validated, names the file
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a valid JSON config ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _check_allocation(allocation: Any, path: str) -> None:
    keys = ("num_experts", "top_k", "r")
    if not isinstance(allocation, dict) or any(
        not isinstance(allocation.get(k), list) for k in keys
    ):
        raise ValueError(
            f"adapter: {path}: 'allocation' must be an object of lists {list(keys)}, "
            f"got {json.dumps(allocation)[:80]}"
        )
    lengths = {len(allocation[k]) for k in keys}
    if len(lengths) != 1 or not allocation["num_experts"]:
        raise ValueError(f"adapter: {path}: 'allocation' lists must be non-empty, equal lengths")
    for key in keys:
        for value in allocation[key]:
            if key == "top_k" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"adapter: {path}: 'allocation' {key} holds {value!r}; expected ints >= 1"
                )


def read_adapter_config(directory: str) -> dict[str, Any]:
    """The validated ``adapter_config.json`` of ``directory``.

    Raises:
        ValueError: one line naming the file: missing, not JSON, not a JSON object, unknown or
            malformed fields, or written by a newer mola.
    """
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise ValueError(f"adapter: {directory} not found")
    if not os.path.isdir(directory):
        raise ValueError(
            f"adapter: {directory} is a file; pass the directory holding {CONFIG_NAME}"
        )
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"adapter: {path} not found; pass a directory written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as err:
        raise ValueError(f"adapter: {path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"adapter: {path} is not valid JSON ({err.msg} at line {err.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"adapter: {path}: expected a JSON object of config fields, got a {_json_type(data)}"
        )
    version = data.get("mola_version")
    if version is not None:
        if not isinstance(version, str) or not _version(version):
            raise ValueError(f"adapter: {path}: 'mola_version' is {version!r}, not a version")
        if _version(version) > _version(__version__):
            raise ValueError(
                f"adapter: {path} was written by mola {version}, newer than this mola "
                f"{__version__}; upgrade mola to load it"
            )
    saved_class = data.get("base_model_class")
    if saved_class is not None and not isinstance(saved_class, str):
        raise ValueError(f"adapter: {path}: 'base_model_class' must be a string")
    base = data.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"adapter: {path}: 'base_model_name_or_path' must be a string")
    if data.get("allocation") is not None:
        _check_allocation(data["allocation"], path)
    try:
        MolaConfig.from_dict(data)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        message = " ".join(str(err).split())
        raise ValueError(f"adapter: {path}: {message}") from None
    return data
