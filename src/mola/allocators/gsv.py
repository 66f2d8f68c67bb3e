"""``GSVLinear``: a ``MolaLinear`` whose expert number and ranks are picked by GuidedSelection
Vectors.

Used only while probing (``mola allocate --strategy guilomo``); never saved. Each adapted module
holds the largest candidate shape (``E_max`` experts of rank ``R_max``) and two GSVs:

* ``lora_gsv_experts`` ``(E_max - e_min + 1,)``: logits over the candidate expert numbers
  ``e_min..E_max`` (``e_min = max(1, top_k)``, so top-k routing always has enough experts);
* ``lora_gsv_ranks`` ``(E_max, R_max)``: for each expert, logits over the candidate ranks
  ``1..R_max``.

Choosing ``k`` experts keeps experts ``1..k`` routable (the router logits of the others are
pushed to -1e4, as in GuiLoMo's code) and choosing rank ``q`` keeps an expert's first ``q`` rank
components (its other rows of ``A`` are masked out). The choice is a straight-through
Gumbel-softmax sample: the forward pass uses the hard prefix mask of the sampled candidate, the
backward pass the gradient of the relaxed one, ``mask_j = sum_{c >= j} softmax((g + G) / tau)_c``
(the probability that component ``j`` is kept). In eval mode the choice is ``argmax g``.

(Names start with ``lora_`` so they follow mola's rule that every trainable tensor is an adapter
tensor; see :func:`mola.core.checkpoint.is_adapter_name`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.core.layer import MolaLinear

MASKED_LOGIT = -1e4  # what GuiLoMo's code adds to the router logits of unselected experts


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

    def __init__(self, layer: MolaLinear, min_experts: int, tau: float = 1.0) -> None:
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
        self.min_experts, self.tau = min_experts, tau
        kw = {"device": self.lora_A.device, "dtype": torch.float32}
        # uniform start: every candidate equally likely (GuiLoMo's code starts near-uniform too)
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
        """The read-off: ``argmax`` expert number and each expert's ``argmax`` rank."""
        experts = int(self.lora_gsv_experts.argmax()) + self.min_experts
        ranks = (self.lora_gsv_ranks.argmax(dim=-1) + 1).tolist()
        return experts, ranks

    def expected(self) -> tuple[float, list[float]]:
        """Expected expert number and each expert's expected rank under ``softmax(g)``."""
        cand_e = torch.arange(self.lora_gsv_experts.numel(), device=self.lora_gsv_experts.device)
        p_e = torch.softmax(self.lora_gsv_experts.detach(), dim=-1)
        experts = float((p_e * (cand_e + self.min_experts)).sum())
        cand_r = torch.arange(1, self.r + 1, device=self.lora_gsv_ranks.device)
        p_r = torch.softmax(self.lora_gsv_ranks.detach(), dim=-1)
        return experts, (p_r * cand_r).sum(dim=-1).tolist()

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        num, rank, d_in, d_out = self.num_experts, self.r, self.in_features, self.out_features
        flat = x.reshape(-1, d_in).to(self.lora_A.dtype)
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


def attach_gsvs(model: nn.Module, tau: float = 1.0) -> list[GSVLinear]:
    """Replace every ``MolaLinear`` inside ``model`` with a :class:`GSVLinear` (fresh weights).

    The GSVs and the experts are left trainable; returns the new layers in model order.
    """
    layers = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, MolaLinear) or isinstance(module, GSVLinear):
            continue
        top_k = module.routing.top_k if module.routing.uses_top_k else 1
        new = GSVLinear(module, min_experts=min(max(1, top_k or 1), module.num_experts), tau=tau)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        layers.append(new)
    return layers
