"""The dense-gated fast path, written once for every expert structure.

Every structure computes its update as ``scaling * W_up · combine(W_down · dropout(x), gates)``:

* ``W_down`` (``K x d_in``) projects all experts at once (``K = E*r`` for stacked experts, ``r``
  for a shared ``A``, ``R`` for rank-wise experts);
* :func:`gate_columns` scales each expert's block of ``h`` by the token's gate. When ``h`` holds
  one block per expert this is a per-block multiply; when it holds a single shared block it is
  the outer product ``g ⊗ h`` (``N x E*r``); the same broadcast does both;
* one fused ``addmm`` adds ``z W_up^T`` to the frozen layer's output.

No Python loop over experts, no host sync; dropout draws one mask on ``x`` shared by the experts
and saves it as one byte per element (:class:`DroppedLinear`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


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


def gate_columns(h: Tensor, gates: Tensor, block: int) -> Tensor:
    """Scale each expert's ``block`` columns of ``h`` by its gate: ``(N, E*block)``.

    ``h`` is ``(N, E*block)`` (one block per expert) or ``(N, block)`` (one block shared by all
    experts, giving the outer product ``g ⊗ h``). ``gates`` is ``(N, E)``.
    """
    n = h.shape[0]
    if gates.dtype != h.dtype:
        gates = gates.to(h.dtype)
    return (h.view(n, -1, block) * gates.unsqueeze(-1)).reshape(n, -1)


def add_projection(result: Tensor, z: Tensor, w_up: Tensor, inplace: bool = False) -> Tensor:
    """``result + z @ w_up^T`` in one fused kernel when the dtypes agree.

    ``inplace`` (no-grad only, ``result`` a fresh contiguous output) adds into ``result``
    itself: the out-of-place ``addmm`` first copies ``result`` into a new tensor.
    """
    d_out = w_up.shape[0]
    flat = result.reshape(-1, d_out)
    if flat.dtype == z.dtype:
        # flat is a view of a contiguous result; autocast does not cast in-place ops' inputs
        if inplace and result.is_contiguous() and w_up.dtype == z.dtype:
            flat.addmm_(z, w_up.t())
            return result
        return torch.addmm(flat, z, w_up.t()).view(result.shape)
    return result + F.linear(z, w_up).view(result.shape).to(result.dtype)
