"""``GSVLinear``: a ``MolaLinear`` whose expert number and ranks are picked by GuidedSelection
Vectors.

Used only while probing (``mola allocate --strategy guilomo``); never saved. Each adapted module
holds the largest candidate shape (``E_max`` experts of rank ``R_max``) and two GSVs:

* ``lora_gsv_experts`` ``(E_max,)``: entry ``i`` stands for "experts ``0..i`` are routable";
* ``lora_gsv_ranks`` ``(E_max, R_max)``: for each expert, entry ``j`` stands for "rank
  components ``0..j`` are kept".

Two estimators (``estimator``):

* ``authors`` (default), as GuiLoMo's code (Liar406/Gui-LoMo ``ArMoLA/src/mola_lora_hacked.py``:
  ``GAMoEGateBackward``, ``GAMoEGateBackward_E``, ``Linear.forward``): the GSVs start random
  (``randn``); the scores are ``s = sigmoid(GSV)``; the forward uses the hard choice ``n =
  argmax s`` (at least ``min_experts - 1``, the code's ``routing_number if != 0 else 1``): the
  router logits get a bias of 0.5 for experts ``0..n`` and -1e4 for the others, and an expert's
  rank mask is 1 for components ``0..m`` and 1e-4 for the others; the backward gives the chosen
  entry ``sum_{j <= n} grad_j * s_j`` and every other entry 0 (experts) or ``1e-4 * grad_j``
  (ranks). Each expert's ``A`` rows are scaled by a trainable per-rank vector
  ``lora_rank_scale`` (``randn``, the code's ``lora_E``) times the rank mask.
* ``gumbel``: mola's earlier straight-through Gumbel-softmax (zero init, hard prefix mask
  forward, the relaxed mask ``m_j = sum_{c >= j} softmax((g + G) / tau)_c`` backward, gates
  multiplied by the expert mask), kept for comparison.

In eval mode both use ``argmax``.

(Names start with ``lora_`` so they follow mola's rule that every trainable tensor is an adapter
tensor; see :func:`mola.core.checkpoint.is_adapter_name`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.core.layer import MolaLinear

MASKED_LOGIT = -1e4  # what GuiLoMo's code adds to the router logits of unselected experts
KEPT_LOGIT = 0.5  # ... and to those of the selected ones
DROPPED_RANK = 1e-4  # the rank mask's value for dropped components (not 0) in their code
ESTIMATORS = ("authors", "gumbel")


class ExpertCountBias(torch.autograd.Function):
    """GuiLoMo's ``GAMoEGateBackward``: scores ``s (E,)`` -> router-logit bias ``(E,)``."""

    @staticmethod
    def forward(ctx, scores: Tensor, min_kept: int) -> Tensor:  # type: ignore[override]
        n = max(int(scores.argmax()), min_kept - 1)
        idx = torch.arange(scores.shape[0], device=scores.device)
        ctx.save_for_backward(scores)
        ctx.n = n
        return torch.where(idx <= n, KEPT_LOGIT, MASKED_LOGIT).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (scores,) = ctx.saved_tensors
        idx = torch.arange(grad.shape[0], device=grad.device)
        cum = torch.cumsum(grad * scores, dim=-1)
        return torch.where(idx == ctx.n, cum, torch.zeros_like(cum)), None


class RankMask(torch.autograd.Function):
    """GuiLoMo's ``GAMoEGateBackward_E``, row-wise: scores ``(E, R)`` -> rank masks ``(E, R)``."""

    @staticmethod
    def forward(ctx, scores: Tensor) -> Tensor:  # type: ignore[override]
        m = scores.argmax(dim=-1, keepdim=True)
        idx = torch.arange(scores.shape[-1], device=scores.device)
        ctx.save_for_backward(scores, m)
        return torch.where(idx <= m, 1.0, DROPPED_RANK).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        scores, m = ctx.saved_tensors
        idx = torch.arange(grad.shape[-1], device=grad.device)
        cum = torch.cumsum(grad * scores, dim=-1)
        return torch.where(idx == m, cum, grad * DROPPED_RANK)


def prefix_mask(logits: Tensor, tau: float, sample: bool) -> Tensor:
    """Straight-through "keep the first k" mask over the last dim of candidate ``logits``.

    Candidate ``c`` (0-based) means "keep components ``0..c``". Forward: a 0/1 prefix mask of the
    chosen candidate (Gumbel-max sample if ``sample``, else ``argmax``). Backward: the gradient
    of the relaxed mask ``m_j = sum_{c >= j} y_c`` with ``y = softmax((logits + G) / tau)``.
    """
    noisy = logits
    if sample:
        gumbel = -torch.empty_like(logits).exponential_().log()
        noisy = logits + gumbel
    soft = torch.softmax(noisy / tau, dim=-1)
    hard = F.one_hot(noisy.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    choice = hard - soft.detach() + soft
    return choice.flip(-1).cumsum(-1).flip(-1)  # m_j = sum_{c >= j} choice_c


class GSVLinear(MolaLinear):
    """A :class:`MolaLinear` with GuidedSelection Vectors over its expert number and ranks.

    Args:
        layer: the ``MolaLinear`` to replace; its base layer, router, scale and bookkeeping are
            reused and its shape (``num_experts``, ``r``) is the largest candidate.
        min_experts: the smallest candidate expert number (``max(1, top_k)``).
        tau: Gumbel-softmax temperature.
    """

    def __init__(
        self, layer: MolaLinear, min_experts: int, tau: float = 1.0, estimator: str = "authors"
    ) -> None:
        num, rank = layer.num_experts, layer.r
        if not 1 <= min_experts <= num:
            raise ValueError(f"min_experts: must be in 1..{num}, got {min_experts}")
        super().__init__(
            layer.base_layer,
            num,
            rank,
            lora_alpha=layer.scaling * rank,
            lora_dropout=getattr(layer.lora_dropout, "p", 0.0),
            top_k=layer.routing.top_k,
            router=layer.routing,
        )
        self.layer_idx, self.module_name = layer.layer_idx, layer.module_name
        self.store = layer.store
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        self.min_experts, self.tau, self.estimator = min_experts, tau, estimator
        kw = {"device": self.lora_A.device, "dtype": torch.float32}
        if estimator == "authors":  # random starts (torch.randn), every candidate entry
            self.lora_gsv_experts = nn.Parameter(torch.randn(num, **kw))
            self.lora_gsv_ranks = nn.Parameter(torch.randn(num, rank, **kw))
            self.lora_rank_scale = nn.Parameter(torch.randn(num, rank, **kw))
        else:  # uniform start: every candidate equally likely
            self.lora_gsv_experts = nn.Parameter(torch.zeros(num - min_experts + 1, **kw))
            self.lora_gsv_ranks = nn.Parameter(torch.zeros(num, rank, **kw))

    def masks(self) -> tuple[Tensor, Tensor]:
        """``(experts (E,), ranks (E, R))`` keep-masks: hard values, straight-through gradients."""
        sample = self.training
        tail = prefix_mask(self.lora_gsv_experts, self.tau, sample)
        head = tail.new_ones(self.min_experts - 1)
        experts = torch.cat([head, tail])
        ranks = prefix_mask(self.lora_gsv_ranks, self.tau, sample)
        return experts, ranks

    def chosen(self) -> tuple[int, list[int]]:
        """The read-off: ``argmax`` expert number and each expert's ``argmax`` rank (as
        ``save_rankandexp_num.py``: ``max(2, argmax + 1)`` experts, ``argmax + 1`` ranks)."""
        if self.estimator == "authors":
            experts = max(self.min_experts, int(self.lora_gsv_experts.argmax()) + 1)
        else:
            experts = int(self.lora_gsv_experts.argmax()) + self.min_experts
        ranks = (self.lora_gsv_ranks.argmax(dim=-1) + 1).tolist()
        return experts, ranks

    def expected(self) -> tuple[float, list[float]]:
        """Expected expert number and each expert's expected rank under ``softmax(g)``."""
        cand_e = torch.arange(self.lora_gsv_experts.numel(), device=self.lora_gsv_experts.device)
        p_e = torch.softmax(self.lora_gsv_experts.detach(), dim=-1)
        first = 1 if self.estimator == "authors" else self.min_experts
        experts = float((p_e * (cand_e + first).clamp_min(self.min_experts)).sum())
        cand_r = torch.arange(1, self.r + 1, device=self.lora_gsv_ranks.device)
        p_r = torch.softmax(self.lora_gsv_ranks.detach(), dim=-1)
        return experts, (p_r * cand_r).sum(dim=-1).tolist()

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        num, rank, d_in, d_out = self.num_experts, self.r, self.in_features, self.out_features
        flat = x.reshape(-1, d_in).to(self.lora_A.dtype)
        if self.estimator == "authors":
            return self._authors_forward(result, flat)
        keep_e, keep_r = self.masks()
        logits = self.router(flat) + (1.0 - keep_e.detach()) * MASKED_LOGIT
        if self.store is not None and self.store.enabled:
            self.store.add(self.layer_idx, self.module_name, logits)
        gates, _ = self.routing.route(logits)
        gates = gates * keep_e  # = gates in value; carries the expert GSV's gradient
        h = F.linear(self.lora_dropout(flat), self.lora_A.reshape(num * rank, d_in))
        h = h.view(-1, num, rank) * (gates * self.scaling).unsqueeze(-1).to(h.dtype)
        h = (h * keep_r.to(h.dtype)).reshape(-1, num * rank)
        w_b = self.lora_B.transpose(0, 1).reshape(d_out, num * rank)
        return result + F.linear(h, w_b).view(result.shape).to(result.dtype)

    def _authors_forward(self, result: Tensor, flat: Tensor) -> Tensor:
        """GuiLoMo's ``Linear.forward``: the expert bias on the router logits, then top-k of the
        softmax, each expert with ``A * (lora_rank_scale * rank_mask)``."""
        num, rank, d_in, d_out = self.num_experts, self.r, self.in_features, self.out_features
        bias = ExpertCountBias.apply(torch.sigmoid(self.lora_gsv_experts), self.min_experts)
        logits = self.router(flat) + bias.to(flat.dtype)
        if self.store is not None and self.store.enabled:
            self.store.add(self.layer_idx, self.module_name, logits)
        gates, _ = self.routing.route(logits)
        keep_r = RankMask.apply(torch.sigmoid(self.lora_gsv_ranks))
        a = self.lora_A * (self.lora_rank_scale * keep_r).unsqueeze(-1).to(self.lora_A.dtype)
        h = F.linear(self.lora_dropout(flat), a.reshape(num * rank, d_in))
        h = h.view(-1, num, rank) * (gates * self.scaling).unsqueeze(-1).to(h.dtype)
        w_b = self.lora_B.transpose(0, 1).reshape(d_out, num * rank)
        return result + F.linear(h.reshape(-1, num * rank), w_b).view(result.shape).to(result.dtype)


def attach_gsvs(model: nn.Module, tau: float = 1.0, estimator: str = "authors") -> list[GSVLinear]:
    """Replace every ``MolaLinear`` inside ``model`` with a :class:`GSVLinear` (fresh weights).

    The GSVs and the experts are left trainable; returns the new layers in model order.
    """
    layers = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, MolaLinear) or isinstance(module, GSVLinear):
            continue
        top_k = module.routing.top_k if module.routing.uses_top_k else 1
        least = min(max(1, top_k or 1), module.num_experts)
        new = GSVLinear(module, min_experts=least, tau=tau, estimator=estimator)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        layers.append(new)
    return layers
