"""Block-level routing: one router per sub-block, shared by the sub-block's adapted modules.

MixLoRA and LLaVA-MoLE route once per MLP block: the gates are computed from the block's input
(the normalised hidden states the MLP receives) and every expert-carrying linear module inside
it (gate, up *and* down projections) uses those same gates, although ``down_proj`` itself reads
the intermediate activation. With ``router_scope: block`` mola does this for every sub-block that
holds adapted modules: the direct parent module of the adapted linears (``mlp``, ``self_attn``;
GPT-2's ``attn`` and ``mlp``). The router lives on that parent as ``<parent>.router`` (so its
weights are named ``...mlp.router.weight``), a forward pre-hook on the parent computes the
routing from the parent's input once per call, and each module reads it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mola.routing.base import Router, Routing

SCOPES = ("module", "block")
"""``module``: a router per adapted linear module (MoLA); ``block``: one per sub-block."""


class SharedRouting:
    """The routing that a sub-block's router computed for the current forward.

    Not an ``nn.Module``: the router is registered on the sub-block, and every adapted module of
    the sub-block holds a reference to this object.
    """

    def __init__(self, owner: nn.Module, router: Router, name: str) -> None:
        self.router = router
        self.name = name
        self.routing: Routing | None = None
        self._handles = [
            owner.register_forward_pre_hook(self._begin, with_kwargs=True),
            owner.register_forward_hook(self._end),
        ]

    def _begin(self, _: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, Tensor):
            raise ValueError(
                f"router_scope: cannot find the input of {self.name} (no positional tensor and "
                f"no hidden_states keyword); use router_scope: module for this model"
            )
        router = self.router
        flat = x.reshape(-1, x.shape[-1]).to(router.weight.dtype)
        self.routing = router.gate(nn.functional.linear(flat, router.fused_weight()), flat)

    def _end(self, *_: Any) -> None:
        self.routing = None  # keep nothing between forwards

    def current(self) -> Routing:
        """The routing of the running forward (``RuntimeError`` outside the sub-block's call)."""
        if self.routing is None:
            raise RuntimeError(
                f"the shared router of {self.name} has no routing: its modules were called "
                f"outside {self.name}'s forward"
            )
        return self.routing

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
