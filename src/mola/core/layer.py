"""``MolaLinear``: a frozen linear layer plus a routed mixture of LoRA experts.

::

                 ┌──────────── W (frozen) ───────────────┐
    x ──────────┤                                         (+)──> y
                 ├─ router R ─> p = softmax(Rx) ─> gates g │
                 └─ dropout ─> [A_1..A_E] ─> (g ⊙) ─> [B_1..B_E] ┘ · alpha / r

    y = W x + (alpha / r) * sum_{e selected} g_e * B_e A_e dropout(x)

The experts are stored stacked, ``lora_A: (E, r, d_in)`` and ``lora_B: (E, d_out, r)``, and the
forward is the *dense-gated* form: one matmul ``h = x A^T`` for all experts at once (``N x E*r``),
``h`` scaled by each token's gate repeated over its expert's ``r`` columns (zero for experts the
token does not use), then one matmul ``y += h B^T``. No Python loop over experts, no host sync;
it equals the per-expert sum exactly. Dropout draws one mask on ``x`` that all experts share.

The router is an ``nn.Module`` named ``router`` (:class:`~mola.routing.Router`, possibly with
parameters and losses of its own), or one router shared by the whole sub-block
(:mod:`mola.routing.scope`). The layer fuses the router's linear rows
(:meth:`~mola.routing.Router.fused_weight`) with the experts' A side into one matmul, hands the
router rows to :meth:`~mola.routing.Router.gate`, and adds the gated B side to the base output
in one ``addmm``. An expert structure (:mod:`mola.experts`) takes the place of the A/B code here
through the same two calls: ``project(x, router.fused_weight(), dropout)`` and
``mix(result, h, routing.gates)``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.core.cache import cache_allowed
from mola.experts import StructureOptions, check_structure
from mola.experts.fastpath import DroppedLinear, add_projection, dropout_mask, gate_columns  # noqa: F401  (re-exported)
from mola.experts.stacked import StackedExperts
from mola.routing import Router, Routing, build_router
from mola.routing.base import topk_gates
from mola.routing.simple import TopKRouter

if TYPE_CHECKING:
    from mola.core.collect import RouterLogitsStore
    from mola.routing.scope import SharedRouting


def features(base_layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (weight ``(in, out)``)."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if type(base_layer).__name__ == "Conv1D" and hasattr(base_layer, "nf"):
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    raise ValueError(
        f"unsupported module type {type(base_layer).__name__}: mola adapts nn.Linear and "
        f"transformers Conv1D; drop it from target_modules"
    )


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The adapter's parameter dtype for a base weight of ``base_dtype``: fp32 master weights
    for a bf16/fp16 or quantized (bitsandbytes int8/uint8) base, as PEFT keeps them; an fp64
    base keeps fp64. The forward casts the input to this dtype and the update back to the base
    output's dtype."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


def is_supported(module: nn.Module) -> bool:
    """Whether :class:`MolaLinear` can wrap ``module``."""
    try:
        features(module)
    except ValueError:
        return False
    return True


class MolaLinear(nn.Module):
    """A frozen ``base_layer`` plus ``num_experts`` routed LoRA experts of rank ``r``.

    Args:
        base_layer: the ``nn.Linear`` (or GPT-2 ``Conv1D``) to adapt; it is frozen, not copied.
        num_experts: number of experts ``E``.
        r: rank of every expert.
        lora_alpha: the LoRA scale is ``lora_alpha / r``.
        lora_dropout: dropout probability on the LoRA input (one mask shared by the experts).
        top_k: experts per token for the ``topk`` router (cap for ``topp``).
        router: a router name from :data:`mola.routing.ROUTERS` or a :class:`Router`; a router
            without parameters is used as a template (this layer gets its own copy with weights).
        top_p: cumulative probability for the ``topp`` router.
        router_options: the router's own settings (see its ``option_names``).
        shared: route with a sub-block's shared router instead of an own one (block scope).

    Attributes:
        lora_A: ``(E, r, d_in)``, kaiming-uniform(a=sqrt 5) per expert, like ``nn.Linear``.
        lora_B: ``(E, d_out, r)``, zeros, so a fresh layer returns exactly ``base_layer(x)``.
        router: the layer's own :class:`Router` (``router.weight (E, d_in)``, its logits rows),
            or ``None`` with a shared router.
        routing: the router this layer routes with (its own or the shared one).
        scaling: ``lora_alpha / r``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        top_k: int | None = 2,
        router: str | Router = "topk",
        top_p: float | None = None,
        *,
        router_options: dict[str, Any] | None = None,
        shared: SharedRouting | None = None,
        experts_structure: str = "stacked",
        structure_options: StructureOptions | None = None,
    ) -> None:
        super().__init__()
        d_in, d_out = features(base_layer)
        if r < 1:
            raise ValueError(f"r: must be >= 1, got {r}")
        if num_experts < 1:
            raise ValueError(f"num_experts: must be >= 1, got {num_experts}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        weight = base_layer.weight
        dtype = adapter_dtype(weight.dtype)
        self.in_features, self.out_features = d_in, d_out
        self.num_experts, self.r = num_experts, r
        self.scaling = lora_alpha / r
        structure = check_structure(experts_structure)
        if structure_options is None:
            structure_options = StructureOptions(top_k=top_k)
        structure_options = dataclasses.replace(structure_options, dropout=lora_dropout)
        self.shared = shared
        own: Router | None = None
        # a single expert (plain LoRA) and an implicit router (FlyLoRA) have no router at all
        routed = structure.learned_router and (num_experts > 1 or shared is not None)
        if shared is not None and (not structure.learned_router or structure.router_reads_h):
            raise ValueError(
                f"router_scope: the {experts_structure} structure routes inside each module; "
                f"use router_scope: module"
            )
        if shared is not None:
            if shared.router.num_experts != num_experts:
                raise ValueError(
                    f"num_experts: {num_experts} differs from the shared router's "
                    f"{shared.router.num_experts} experts in {shared.name}"
                )
        elif routed:
            if isinstance(router, Router):
                if router.weight is None:  # a template: same rule, own weights
                    top_k, top_p = router.top_k, router.top_p
                    router_options = {**router.options, **(router_options or {})}
                    router = router.name
                elif router.in_features != (r if structure.router_reads_h else d_in):
                    raise ValueError(f"router: reads {router.in_features} features, not {d_in}")
            own = router
            if not isinstance(own, Router):  # initialised once here, again below (RNG order)
                own = build_router(
                    own,
                    num_experts,
                    top_k,
                    top_p,
                    r if structure.router_reads_h else d_in,
                    dtype=dtype,
                    device=weight.device,
                    **(router_options or {}),
                )
        self.router = own
        # the random stream of mola <= 0.1: router, A, router again
        self.experts = structure(
            d_in, d_out, num_experts, r, lora_alpha, structure_options,
            device=weight.device, dtype=dtype,
        )  # fmt: skip
        if self.router is not None:
            self.router.reset_parameters()
        self.scaling = self.experts.scaling  # SMoRA scales by alpha / k
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.disabled = False
        self.layer_idx: int | None = None
        self.module_name = ""
        self.store: RouterLogitsStore | None = None
        # modules reading the same input, run as one at inference (mola.inference.fused)
        self.input_group: Any = None
        # weights derived for the no-grad path (kept by the experts, see Experts.project)
        self._fused_a, self._b_rows = self.experts.fused_cache, self.experts.up_cache

    @property
    def routing(self) -> Router | None:
        """The router this layer routes with: its own, the sub-block's shared one, or ``None``
        (one expert, a plain LoRA; or a structure that routes itself, FlyLoRA)."""
        return self.shared.router if self.shared is not None else self.router

    @property
    def lora_A(self) -> Tensor:
        """The experts' down-projection tensor (``(E, r, d_in)`` for stacked experts)."""
        return self.experts.lora_A

    @property
    def lora_B(self) -> Tensor:
        """The experts' up-projection tensor (``(E, d_out, r)`` for stacked experts)."""
        return self.experts.lora_B

    @property
    def structure(self) -> str:
        return self.experts.structure

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "routing":  # nn.Module would register it as a submodule
            self.set_routing(value)
        elif name in ("lora_A", "lora_B") and "experts" in self._modules:
            setattr(self.experts, name, value)  # the tensors live in the experts module
        else:
            super().__setattr__(name, value)

    def set_routing(self, router: Router) -> None:
        """Route with ``router`` from now on (also ``layer.routing = router``); a router
        without weights gets this layer's router weights."""
        if self.shared is not None:
            raise ValueError("routing: this layer uses its sub-block's shared router")
        if router.weight is None and self.router is not None:
            router.weight, router.in_features = self.router.weight, self.router.in_features
        self.router = router

    def reset_parameters(self) -> None:
        """The experts as their structure says (``B = 0``) and the router as ``nn.Linear``."""
        self.experts.reset_parameters()
        if self.router is not None:
            self.router.reset_parameters()

    def router_logits(self, x: Tensor) -> Tensor:
        """Router logits ``(N, E)`` for input ``x`` of shape ``(..., d_in)``."""
        router = self.routing
        if router is None:
            raise ValueError(f"{self.module_name or 'this layer'} has no learned router")
        flat = x.reshape(-1, self.in_features).to(router.weight.dtype)
        if self.experts.router_reads_h:
            flat = F.linear(flat, self.experts.down_weight())
        return router(flat)

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        group = self.input_group
        if group is not None and not args and not kwargs:
            out = group.output(self, x)
            if out is not None:
                return out
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        experts = self.experts
        if (
            type(experts) is StackedExperts
            and type(self.router) is TopKRouter
            and self.shared is None
            and not experts.training
            and (self.store is None or not self.store.enabled)
            and cache_allowed()
        ):
            return self._decode(result, x)
        flat = x.reshape(-1, self.in_features)
        dtype = experts.lora_B.dtype
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        routing, h, gates = self._project(flat)
        if routing is not None and self.store is not None and self.store.enabled:
            self.store.add(self.layer_idx, self.module_name, routing)
        return experts.mix(result, h, gates)

    def _decode(self, result: Tensor, x: Tensor) -> Tensor:
        """The no-grad path of the common case (own ``topk`` router reading ``x``, stacked
        experts, nothing recorded) in one method: the same kernels as :meth:`forward`'s general
        path, without the ``Routing`` object and the method hops; equal outputs (tested)."""
        experts = self.experts
        flat = x.reshape(-1, self.in_features)
        lora_a, lora_b = experts.lora_A, experts.lora_B
        if flat.dtype != lora_b.dtype:
            flat = flat.to(lora_b.dtype)
        router = self.router
        weight = router.weight
        fused = experts.fused_cache.get(
            (weight, lora_a, lora_b), lambda: torch.cat([weight, experts.down_weight()])
        )
        w_up = experts.up_cache.get((lora_a, lora_b), experts.scaled_up_weight)
        e = router.num_experts
        both = F.linear(flat, fused)
        gates, _ = topk_gates(both[:, :e], router.top_k or 1)
        z = gate_columns(both[:, e:], gates, experts.block)
        return add_projection(result, z, w_up, inplace=True)

    def _project(self, flat: Tensor) -> tuple[Routing | None, Tensor, Tensor | None]:
        """The routing of ``x`` (``None`` without a learned router), the experts' down side
        ``h`` and the dense gates (``None``: one expert, gate 1).

        Without dropout and with an own router reading ``x``, one matmul gives the router's rows
        and ``h`` (:meth:`mola.experts.Experts.project`).
        """
        dropout = self.lora_dropout
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        experts = self.experts
        if self.shared is not None:
            routing = self.shared.current()
            return routing, experts.project(flat, None, p)[1], routing.gates
        router = self.router
        if router is None:
            h = experts.project(flat, None, p)[1]
            if experts.learned_router:  # one expert: a plain LoRA
                return None, h, None
            return None, h, experts.implicit_gates(h)
        z, h = experts.project(flat, router.fused_weight(), p, router.fused_sources())
        routing = router.gate(z, h if experts.router_reads_h else flat)
        if experts.biased_routing:  # SMoRA: loss-free balancing bias
            gates, mask = experts.route_biased(routing.logits)
            routing = Routing(routing.logits, gates, mask, routing.extras)
        return routing, h, routing.gates

    def extra_repr(self) -> str:
        scope = " (shared)" if self.shared is not None else ""
        router = self.routing.name if self.routing is not None else "none"
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"r={self.r}, scaling={self.scaling:g}, structure={self.structure}, "
            f"router={router}{scope}"
        )
