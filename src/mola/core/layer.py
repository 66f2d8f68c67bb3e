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

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.inference.cache import DerivedWeights
from mola.routing import Router, Routing, build_router

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


def is_supported(module: nn.Module) -> bool:
    """Whether :class:`MolaLinear` can wrap ``module``."""
    try:
        features(module)
    except ValueError:
        return False
    return True


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """A boolean keep-mask for ``x``: each element kept with probability ``1 - p``."""
    return torch.rand_like(x) >= p


class DroppedLinear(torch.autograd.Function):
    """``F.linear(x * keep / (1 - p), weight)`` that saves ``x`` and a boolean mask for backward.

    Plain dropout followed by a linear layer keeps the dropped-out copy of ``x`` (4 bytes per
    element) alive until backward; the router already keeps ``x`` itself, so saving the 1-byte
    mask and re-applying it in backward costs one multiply and saves that copy.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        return F.linear(x * keep * scale, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight, keep = ctx.saved_tensors
        grad_x = grad_w = None
        # under autocast the forward ran in grad's dtype; gradients go back in each input's
        if ctx.needs_input_grad[0]:
            grad_x = ((grad @ weight.to(grad.dtype)) * keep * ctx.scale).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad.t() @ (x * keep * ctx.scale).to(grad.dtype)).to(weight.dtype)
        return grad_x, grad_w, None, None


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
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.in_features, self.out_features = d_in, d_out
        self.num_experts, self.r = num_experts, r
        self.scaling = lora_alpha / r
        kw = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, d_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, r, **kw))
        self.shared = shared
        own: Router | None = None
        if shared is not None:
            if shared.router.num_experts != num_experts:
                raise ValueError(
                    f"num_experts: {num_experts} differs from the shared router's "
                    f"{shared.router.num_experts} experts in {shared.name}"
                )
        else:
            if isinstance(router, Router):
                if router.weight is None:  # a template: same rule, own weights
                    top_k, top_p = router.top_k, router.top_p
                    router_options = {**router.options, **(router_options or {})}
                    router = router.name
                elif router.in_features != d_in:
                    raise ValueError(
                        f"router: reads {router.in_features} features, the layer has {d_in}"
                    )
            own = router
            if not isinstance(own, Router):  # initialised once here, again below (RNG order)
                own = build_router(
                    own,
                    num_experts,
                    top_k,
                    top_p,
                    d_in,
                    dtype=dtype,
                    device=weight.device,
                    **(router_options or {}),
                )
        self.router = own
        self.reset_parameters()  # the random stream of mola <= 0.1: router, A, router again
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.disabled = False
        self.layer_idx: int | None = None
        self.module_name = ""
        self.store: RouterLogitsStore | None = None
        # weights derived for the no-grad path, rebuilt when a source parameter changes
        self._fused_a, self._b_rows = DerivedWeights(), DerivedWeights()

    def train(self, mode: bool = True) -> MolaLinear:
        self._fused_a.clear()
        self._b_rows.clear()
        return super().train(mode)

    @property
    def routing(self) -> Router:
        """The router this layer routes with: its own, or the sub-block's shared one."""
        return self.shared.router if self.shared is not None else self.router

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "routing":  # nn.Module would register it as a submodule
            self.set_routing(value)
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
        """``A_e`` and the router as ``nn.Linear`` does (kaiming-uniform, a=sqrt 5); ``B = 0``."""
        with torch.no_grad():
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B.zero_()
        if self.router is not None:
            self.router.reset_parameters()

    def router_logits(self, x: Tensor) -> Tensor:
        """Router logits ``(N, E)`` for input ``x`` of shape ``(..., d_in)``."""
        router = self.routing
        return router(x.reshape(-1, router.in_features).to(router.weight.dtype))

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        a = self.lora_A.reshape(self.num_experts * self.r, self.in_features)
        routing, h = self._project(x.reshape(-1, self.in_features).to(a.dtype), a)
        if self.store is not None and self.store.enabled:
            self.store.add(self.layer_idx, self.module_name, routing)
        return self._mix(result, h, routing.gates)

    def _project(self, flat: Tensor, a: Tensor) -> tuple[Routing, Tensor]:
        """The routing of ``x`` and the experts' A side ``h = dropout(x) A^T``.

        Without dropout and with an own router, one matmul gives the router's rows and ``h``.
        """
        p = getattr(self.lora_dropout, "p", 0.0)
        dropping = self.training and p > 0
        if dropping:
            keep = dropout_mask(flat, p)
            h = DroppedLinear.apply(flat, a, keep, 1.0 / (1.0 - p))
        if self.shared is not None:
            return self.shared.current(), h if dropping else F.linear(flat, a)
        router = self.router
        if dropping:
            return router.gate(F.linear(flat, router.fused_weight()), flat), h
        # inference: [router; A] built once, keyed on the source parameters (inference.cache)
        params = (*router.fused_sources(), self.lora_A)
        fused = self._fused_a.get(params, lambda: torch.cat([router.fused_weight(), a]))
        both = F.linear(flat, fused)
        rows = fused.shape[0] - a.shape[0]
        return router.gate(both[:, :rows], flat), both[:, rows:]

    def _mix(self, result: Tensor, h: Tensor, gates: Tensor) -> Tensor:
        """``result + scaling * sum_e g_e B_e h_e``: gate each expert's r columns, one matmul."""
        num, rank, d_out = self.num_experts, self.r, self.out_features
        g = (gates * self.scaling).to(h.dtype)  # (N, E)
        h = (h.reshape(-1, num, rank) * g.unsqueeze(-1)).reshape(-1, num * rank)
        w_b = self._b_rows.get(  # [o, e*r+j] = B[e, o, j]; kept as its contiguous transpose
            (self.lora_B,), lambda: self.lora_B.transpose(0, 1).reshape(d_out, num * rank)
        )
        flat = result.reshape(-1, d_out)
        if flat.dtype == h.dtype:  # fused: result + h @ w_b^T in one kernel
            return torch.addmm(flat, h, w_b.t()).view(result.shape)
        return result + F.linear(h, w_b).view(result.shape).to(result.dtype)

    def extra_repr(self) -> str:
        scope = " (shared)" if self.shared is not None else ""
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"r={self.r}, scaling={self.scaling:g}, "
            f"router={self.routing.name}{scope}"
        )
