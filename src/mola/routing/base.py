"""The router interface: a module that turns a token's input into dense expert gates.

A router is an ``nn.Module``. Its trainable tensors are named under the adapted layer's
``router`` attribute (``...q_proj.router.weight``, ``...router.lambda_proj.weight``), so
checkpoints pick them up. It works in three steps, split so that the layer can fuse the router's
linear part with the experts' ``A`` projection into one matmul:

1. :meth:`Router.fused_weight` gives the rows ``W_r (P, d_in)`` applied linearly to ``x``: the
   ``E`` logit rows, then any extra linear heads of the router (``P >= E`` rows);
2. the layer computes ``z = x W_r^T`` (together with ``x A^T``);
3. :meth:`Router.gate` turns ``z`` (and ``x``, for routers with non-linear heads) into a
   :class:`Routing`: dense fp32 gates ``(N, E)``, zero for the experts a token does not use, the
   selection mask and the logits, plus router-specific tensors for its losses and the analysis.

``router(x)`` alone returns the ``E`` logits, like the ``nn.Linear`` it replaces. A router built
without ``in_features`` has no parameters; it still routes logits (:meth:`Router.route`) and
computes losses, which is what the losses, the analysis and the shared (block-level) scope use.

:meth:`Router.layer_losses` returns the router's auxiliary losses by name for a set of routing
records (``aux_loss`` = MoLA's load-balancing loss for every router, others per family). Which
records form one set, and how the sets add up, is the reduction (:data:`REDUCTIONS`, the config
key ``aux_loss_reduction``; default: the router's ``aux_loss_reduction``, its authors' choice):
per decoder layer summed over layers (MoLA), per module summed or averaged, or once over all
layers. The model weights each loss by the config key ``<name>_coef``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.routing.losses import load_balancing_loss, share_balance_loss

REDUCTIONS: dict[str, str] = {
    "layer": "one loss per decoder layer on the stacked rows of its modules, summed over layers "
    "(MoLA)",
    "module_sum": "one loss per adapted module, summed over all modules (AdaMoLE, LoRAMoE)",
    "module_mean": "one loss per adapted module, averaged over all modules (LD-MoLE)",
    "global": "one loss over the rows of every layer's modules concatenated (DynMoLE)",
    "mixtral": "one loss over all layers concatenated with f_i counted per top-k slot "
    "(sum_i f_i = k): Mixtral's load_balancing_loss_func (MixLoRA in MoE-PEFT)",
}
"""How the auxiliary losses aggregate over modules and layers (``aux_loss_reduction``)."""


class Routing:
    """One module's routing decision for ``N`` tokens.

    Attributes:
        logits: ``(N, E)`` router scores (what the z-loss and the analysis' entropy read).
        gates: ``(N, E)`` fp32 dense gates, zero where unused.
        mask: ``(N, E)`` bool, the experts each token uses. Only the losses, the analysis and
            the load measurement read it, so a router that selects by index (``topk``) passes
            ``indices`` instead and the mask is built on first access: inference never builds it.
        indices: ``(N, k)`` the selected experts' indices, or ``None``.
        extras: router-specific tensors (a token's sparsegen lambda, a learned threshold, ...).
    """

    __slots__ = ("logits", "gates", "indices", "extras", "_mask")

    def __init__(
        self,
        logits: Tensor,
        gates: Tensor,
        mask: Tensor | None = None,
        extras: dict[str, Tensor] | None = None,
        *,
        indices: Tensor | None = None,
    ) -> None:
        if mask is None and indices is None:
            raise ValueError("Routing: give the selection mask or the selected indices")
        self.logits, self.gates, self.indices = logits, gates, indices
        self.extras = {} if extras is None else extras
        self._mask = mask

    @property
    def mask(self) -> Tensor:
        if self._mask is None:
            self._mask = index_mask(self.indices, self.gates.shape[-1])
        return self._mask

    @mask.setter
    def mask(self, value: Tensor) -> None:
        self._mask = value

    @property
    def active(self) -> Tensor:
        """``(N,)`` the number of experts each token uses."""
        return self.mask.sum(dim=-1)

    def __repr__(self) -> str:
        shape = tuple(self.gates.shape)
        return f"Routing(gates {shape}, extras {sorted(self.extras)})"


def index_mask(indices: Tensor, num_experts: int) -> Tensor:
    """``(N, E)`` boolean mask of the experts in each row of ``indices (N, k)``."""
    mask = torch.zeros(*indices.shape[:-1], num_experts, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)


def renormalise(gates: Tensor) -> Tensor:
    """Rows scaled to sum 1 (rows of zeros stay zero)."""
    return gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)


def keep(probs: Tensor, mask: Tensor, renorm: bool) -> Tensor:
    """``probs`` where ``mask``, zero elsewhere, optionally renormalised per row."""
    gates = probs * mask
    return renormalise(gates) if renorm else gates


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of each row's ``k`` largest scores."""
    return index_mask(scores.topk(k, dim=-1).indices, scores.shape[-1])


def topk_gates(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The renormalised top-``k`` of ``softmax(logits)`` (fp32 dense gates) and the indices.

    Renormalising the kept probabilities cancels the softmax's denominator, so this is the
    softmax of the ``k`` largest logits, scattered into zeros: three kernels instead of a
    softmax over all ``E``, a mask, a product, a sum and a division. Softmax is monotone, so the
    ``k`` largest logits are the ``k`` largest probabilities; the gradients are the same
    function's (zero for the experts not selected).
    """
    values, indices = logits.topk(k, dim=-1)  # bf16 -> fp32 is exact: the same order
    gates = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return gates.scatter_(-1, indices, torch.softmax(values, -1, dtype=torch.float32)), indices


class Router(nn.Module):
    """Base class. Subclasses set ``name``, ``description``, ``paper`` and implement ``select``
    (parameter-free rules on ``p = softmax(logits)``) or override :meth:`gate`.

    Args:
        num_experts: ``E``.
        top_k: experts per token (routers with ``uses_top_k``).
        top_p: cumulative probability (``topp``).
        in_features: ``d_in``; without it the router has no parameters.
        dtype, device: of the parameters.
        options: router-specific settings (the names in ``option_names``).
    """

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    uses_top_k: ClassVar[bool] = False
    requires_top_k: ClassVar[bool] = False
    option_names: ClassVar[tuple[str, ...]] = ()
    loss_names: ClassVar[tuple[str, ...]] = ("aux_loss",)
    dynamic: ClassVar[bool] = False  # a per-token number of experts
    aux_loss_reduction: ClassVar[str] = "layer"  # the default of its authors (REDUCTIONS)
    default_top_p: ClassVar[float | None] = None  # top_p when none is given
    bias = None  # like nn.Linear(d_in, E, bias=False)

    def __init__(
        self,
        num_experts: int,
        top_k: int | None = None,
        top_p: float | None = None,
        in_features: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.top_p = self.default_top_p if top_p is None else top_p
        self.in_features = in_features
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise ValueError(f"router: {self.name!r} takes no option(s) {unknown}")
        self.options = dict(options)
        if in_features is None:
            self.register_parameter("weight", None)
        else:
            kw = {"dtype": dtype, "device": device}
            self.weight = nn.Parameter(torch.empty(num_experts, in_features, **kw))
            self.build(in_features, **kw)
            self.reset_parameters()

    # -- parameters ----------------------------------------------------------------------------
    def build(self, in_features: int, **kw: Any) -> None:
        """Create parameters beyond ``weight`` (subclasses; names appear under ``router.``)."""

    def reset_parameters(self) -> None:
        """``weight`` as ``nn.Linear`` does (kaiming-uniform, a = sqrt 5)."""
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def fused_sources(self) -> tuple[Tensor, ...]:
        """The parameters :meth:`fused_weight` is built from (the key of a cached copy)."""
        return (self.weight,)

    def fused_weight(self) -> Tensor:
        """The rows applied linearly to ``x`` (``(P, d_in)``, the E logits first), fused with A."""
        return self.weight

    # -- routing -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Router logits ``(..., E)`` of ``x``: ``x W^T``."""
        return F.linear(x, self.weight)

    def gate(self, z: Tensor, x: Tensor) -> Routing:
        """The routing of tokens ``x (N, d_in)`` given ``z = x fused_weight()^T`` ``(N, P)``."""
        logits = z[:, : self.num_experts]
        gates, mask = self.route(logits)
        return Routing(logits, gates, mask)

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Gates (fp32, ``(N, E)``, zero where unused) and the selection mask, from logits."""
        return self.select(torch.softmax(logits.float(), dim=-1))

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """``(gates, mask)`` from fp32 probabilities ``(N, E)`` (parameter-free routers)."""
        raise NotImplementedError(f"router {self.name!r} routes with gate(), not select()")

    # -- losses --------------------------------------------------------------------------------
    def layer_losses(
        self,
        records: Sequence[Routing],
        attention_mask: Tensor | None = None,
        context: Mapping[str, Any] | None = None,
        global_batch: bool = False,
    ) -> dict[str, Tensor]:
        """This router's unweighted auxiliary losses for one set of records, by name.

        Args:
            records: the routing of the set's adapted modules in this forward (a decoder
                layer's, one module's or every layer's, by the reduction).
            attention_mask: ``(B, T)``; padding rows are left out.
            context: batch-level values (``group``: each example's type, for LoRAMoE;
                ``batch_size``).
            global_batch: take the statistics over all processes (data parallelism): every
                router's losses are then those of the global batch, with gradients scaled so
                that N processes step like one holding the whole batch (see
                :func:`mola.utils.distributed.global_sums`).
        """
        return {"aux_loss": self.balance_loss(records, attention_mask, global_batch)}

    #: ``E * sum_i f_i P_i`` from :meth:`balance_terms` (routers that define it): ``f_i``
    #: normalised to sum 1 (``balance_normalise``) or a mean per row; assignments counted as
    #: ``!= 0`` (``balance_count``) or summed as they are (see :func:`share_balance_loss`).
    balance_normalise: ClassVar[bool] = False
    balance_count: ClassVar[bool] = True

    def balance_terms(self, record: Routing) -> tuple[Tensor, Tensor] | None:
        """``(assignments, probabilities)`` ``(N, E)`` of one record for the balance loss, or
        ``None`` for MoLA's :func:`load_balancing_loss` on the logits and selection."""
        return None

    def balance_loss(
        self,
        records: Sequence[Routing],
        attention_mask: Tensor | None = None,
        global_batch: bool = False,
    ) -> Tensor:
        """The balance loss (``aux_loss``) of ``records``: MoLA's, or the router's own terms."""
        terms = [self.balance_terms(r) for r in records]
        if any(t is None for t in terms):
            logits = [r.logits for r in records]
            masks = [r.mask for r in records]
            return load_balancing_loss(logits, self, attention_mask, global_batch, masks=masks)
        return share_balance_loss(
            [t[0] for t in terms],  # type: ignore[index]
            [t[1] for t in terms],  # type: ignore[index]
            attention_mask,
            normalise=self.balance_normalise,
            count=self.balance_count,
            global_batch=global_batch,
        )

    def extra_repr(self) -> str:
        text = f"{self.name}, num_experts={self.num_experts}"
        if self.uses_top_k:
            text += f", top_k={self.top_k}"
        if self.in_features is not None:
            text += f", in_features={self.in_features}"
        return text
