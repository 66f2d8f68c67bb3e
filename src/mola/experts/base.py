"""``Experts``: the adapter tensors of one adapted module and how they turn ``x`` into an update.

A structure subclass says three things, and the fast path (:mod:`mola.experts.fastpath`) does
the rest with two matmuls:

* :meth:`Experts.down_weight`: ``W_down (K, d_in)``, every expert's down-projection at once;
* :attr:`Experts.block`: how many columns of ``h = W_down x`` each gate scales;
* :meth:`Experts.up_weight`: ``W_up (d_out, M)``, applied to the gated columns (after
  :meth:`Experts.combine`, which only the core-space structure changes).

The module's output is ``base(x) + scaling * W_up combine(gate_columns(W_down drop(x), g))``.
:meth:`Experts.factors` gives every expert's effective update ``dW_e = B_e A_e`` as stacked
factors, for the redundancy analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.core.cache import DerivedWeights, cache_allowed, module_tensors
from mola.experts.fastpath import DroppedLinear, add_projection, dropout_mask, gate_columns


@dataclass(frozen=True)
class StructureOptions:
    """Structure-specific settings (from :class:`~mola.MolaConfig`)."""

    top_k: int | None = None
    a_dropout: float = 0.0
    fly_sparsity: float | None = None
    balance_bias_rate: float | None = None  # None: the structure's authors' step
    smora_gating: str = "sigmoid"
    dropout: float = 0.0  # the layer's LoRA dropout (CoMoL also drops its merged core)
    expert_ranks: tuple[int, ...] | None = None  # stacked: each expert's own rank (<= r)


class Experts(nn.Module):
    """Base class of the expert structures; see the module docstring.

    Class attributes:
        structure: the config name (``experts_structure``).
        rank_experts: every rank is an expert (``num_experts == r``).
        learned_router: the layer gives it a learned router (else :meth:`implicit_gates`).
        router_reads_h: the router reads ``h = A x`` (``r`` features), not ``x``.
    """

    structure: ClassVar[str] = "base"
    rank_experts: ClassVar[bool] = False
    learned_router: ClassVar[bool] = True
    router_reads_h: ClassVar[bool] = False
    biased_routing: bool = False  # SMoRA's selection bias (a property there)
    a_dropout: float = 0.0  # MoSLD's dropout on the entries of a shared A

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_experts: int,
        r: int,
        lora_alpha: float,
        options: StructureOptions | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"r: must be >= 1, got {r}")
        if num_experts < 1:
            raise ValueError(f"num_experts: must be >= 1, got {num_experts}")
        self.in_features, self.out_features = d_in, d_out
        self.num_experts, self.r = num_experts, r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.options = options or StructureOptions()
        self.factory = {"device": device, "dtype": dtype}
        # no-grad path: [router; W_down] and W_up built once (mola.core.cache)
        self.fused_cache, self.up_cache = DerivedWeights(), DerivedWeights()

    def train(self, mode: bool = True) -> Experts:
        self.fused_cache.clear()
        self.up_cache.clear()
        return super().train(mode)

    # -- what a structure defines -----------------------------------------------------------
    block: int = 1

    def down_weight(self) -> Tensor:
        raise NotImplementedError

    def up_weight(self) -> Tensor:
        raise NotImplementedError

    def combine(self, z: Tensor) -> Tensor:
        """Map the gated columns ``(N, E*block)`` to ``up_weight``'s input (identity here)."""
        return z

    def implicit_gates(self, h: Tensor) -> Tensor:
        """Gates of a structure without a learned router, from ``h``."""
        raise NotImplementedError(f"{self.structure} uses a learned router")

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A (E, r', d_in), B (E, d_out, r'))`` with ``dW_e = scaling * B_e A_e``."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        raise NotImplementedError

    # -- the fast path, shared by every structure -------------------------------------------
    @property
    def router_in_features(self) -> int:
        return self.r if self.router_reads_h else self.in_features

    def project(
        self,
        flat: Tensor,
        router_weight: Tensor | None,
        dropout: float,
        router_sources: tuple[Tensor, ...] | None = None,
    ) -> tuple[Tensor | None, Tensor]:
        """Router logits (``None`` without a router) and ``h = W_down dropout(x)``.

        Without dropout and with a router that reads ``x``, one matmul gives both.
        """
        reads_x = router_weight is not None and not self.router_reads_h
        logits = None
        if self.training and dropout > 0:
            w = self.down_weight()
            h = DroppedLinear.apply(flat, w, dropout_mask(flat, dropout), 1.0 / (1.0 - dropout))
            if reads_x:
                logits = F.linear(flat, router_weight)
        elif reads_x:
            if self.training and self.a_dropout > 0:  # MoSLD: a fresh mask at every call
                fused = torch.cat([router_weight, self.down_weight()])
            else:
                # keyed on the router's source parameters (its rows may be computed afresh)
                sources = (*(router_sources or (router_weight,)), *module_tensors(self))
                fused = self.fused_cache.get(
                    sources, lambda: torch.cat([router_weight, self.down_weight()])
                )
            both = F.linear(flat, fused)
            e = router_weight.shape[0]
            logits, h = both[:, :e], both[:, e:]
        else:
            h = F.linear(flat, self.down_weight())
        if router_weight is not None and self.router_reads_h:
            logits = F.linear(h, router_weight)
        return logits, h

    def mix(self, result: Tensor, h: Tensor, gates: Tensor | None) -> Tensor:
        """``result + scaling * W_up combine(gate_columns(h, gates))`` (``gates`` ``None``: a
        single expert with gate 1, ``h`` used as it is).

        With gradients off the cached ``W_up`` carries the scale (one kernel less per call)
        and the update is added to ``result`` in place; with gradients on the scale multiplies
        the gates, as the graph has always been.
        """
        if cache_allowed():
            w_up = self.up_cache.get(module_tensors(self), self.scaled_up_weight)
            z = h if gates is None else gate_columns(h, gates, self.block)
            return add_projection(result, self.combine(z), w_up, inplace=True)
        if gates is None:
            z = h * self.scaling
        else:
            z = gate_columns(h, gates * self.scaling, self.block)
        return add_projection(result, self.combine(z), self.up_weight())

    def scaled_up_weight(self) -> Tensor:
        """``scaling * W_up``, contiguous (the no-grad path's cached up-projection)."""
        return self.up_weight() * self.scaling

    def delta(self, flat: Tensor, gates: Tensor) -> Tensor:
        """The update alone for ``flat`` (no dropout): ``(N, d_out)``."""
        h = F.linear(flat, self.down_weight())
        return self.mix(flat.new_zeros(flat.shape[0], self.out_features), h, gates)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}, "
            f"structure={self.structure}"
        )


def kaiming_(tensor: Tensor) -> Tensor:
    """``nn.Linear``'s default init (kaiming-uniform, a = sqrt 5) on a 2-D weight."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
