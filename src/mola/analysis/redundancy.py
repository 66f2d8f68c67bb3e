"""Expert redundancy from the weights alone: how far apart the experts' updates are.

MoLA's evidence that lower layers need fewer experts: the mean pairwise Frobenius distance
``||scaling * (B_i A_i - B_j A_j)||_F`` between a module's experts is small in lower layers and
grows with depth. Computed without data, and (``method="gram"``) without forming any
``d_out x d_in`` update: only ``r x r`` Gram matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mola.core.layer import MolaLinear
from mola.core.model import module_keys

if TYPE_CHECKING:
    from mola.core.model import MolaModel

METHODS = ("auto", "gram", "dense")

# Squared distances below this fraction of ||dW_i||^2 + ||dW_j||^2 are rounding noise of the
# Gram form (float64) and are reported as exactly 0.
_GRAM_NOISE = 1e-12


def _gram(lora_a: Tensor, lora_b: Tensor, method: str) -> tuple[Tensor, str]:
    """``G[i, j] = <B_i A_i, B_j A_j>_F`` (float64) without forming ``B_e A_e``, or ``dense``."""
    num, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    if method == "auto":
        method = "gram" if rank * rank * (d_in + d_out) <= d_in * d_out else "dense"
    if method == "dense":
        return torch.empty(0), method
    a, b = lora_a.detach().double(), lora_b.detach().double()
    gram_a = torch.einsum("ird,jsd->ijrs", a, a)  # A_i A_j^T
    gram_b = torch.einsum("ior,jos->ijrs", b, b)  # B_i^T B_j
    # <B_i A_i, B_j A_j>_F = tr(A_i^T B_i^T B_j A_j) = sum_rs (B_i^T B_j)_rs (A_i A_j^T)_rs
    gram = (gram_a * gram_b).sum(dim=(-2, -1))
    return (gram + gram.T) / 2, method  # exactly symmetric despite rounding order


def _check_experts(lora_a: Tensor, lora_b: Tensor, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose from {', '.join(METHODS)}")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError("lora_A must be (E, r, d_in) and lora_B (E, d_out, r)")
    if lora_a.shape[0] != lora_b.shape[0] or lora_a.shape[1] != lora_b.shape[2]:
        raise ValueError(
            f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not fit: need "
            f"(E, r, d_in) and (E, d_out, r)"
        )


def pairwise_expert_distances(
    lora_A: Tensor, lora_B: Tensor, scaling: float = 1.0, *, method: str = "auto"
) -> Tensor:
    """``D[i, j] = ||scaling * (B_i A_i - B_j A_j)||_F`` for all expert pairs, in float64.

    ``gram`` never forms a ``d_out x d_in`` matrix: with the ``r x r`` Gram matrices,
    ``||B_i A_i - B_j A_j||^2 = tr((A_i A_i^T)(B_i^T B_i)) + tr((A_j A_j^T)(B_j^T B_j))
    - 2 tr((A_j A_i^T)(B_i^T B_j))``; tiny negative (and noise-level) results become 0.
    ``dense`` forms every update and subtracts. ``auto`` picks ``gram`` when
    ``r^2 (d_in + d_out) <= d_in d_out``, i.e. when it is the cheaper one.

    Args:
        lora_A: ``(E, r, d_in)``.
        lora_B: ``(E, d_out, r)``.
        scaling: the LoRA scale ``alpha / r``.
        method: ``auto``, ``gram`` or ``dense``.

    Returns:
        A symmetric ``(E, E)`` float64 CPU tensor with a zero diagonal.
    """
    _check_experts(lora_A, lora_B, method)
    gram, used = _gram(lora_A, lora_B, method)
    num = lora_A.shape[0]
    if used == "dense":
        updates = torch.einsum("eor,erd->eod", lora_B.detach().double(), lora_A.detach().double())
        dist = torch.zeros(num, num, dtype=torch.float64, device=updates.device)
        for i in range(num):
            for j in range(i + 1, num):
                dist[i, j] = dist[j, i] = torch.linalg.matrix_norm(updates[i] - updates[j])
        return (dist * abs(scaling)).cpu()
    diag = gram.diagonal()
    scale = diag[:, None] + diag[None, :]
    squared = scale - 2.0 * gram
    squared = torch.where(squared <= _GRAM_NOISE * scale, torch.zeros_like(squared), squared)
    squared.fill_diagonal_(0.0)
    return (squared.sqrt() * abs(scaling)).cpu()


def expert_update_norms(lora_A: Tensor, lora_B: Tensor, scaling: float = 1.0) -> Tensor:
    """``||scaling * B_e A_e||_F`` per expert (float64 ``(E,)``), via the Gram form."""
    _check_experts(lora_A, lora_B, "gram")
    gram, _ = _gram(lora_A, lora_B, "gram")
    return (gram.diagonal().clamp_min(0.0).sqrt() * abs(scaling)).cpu()


def mean_pairwise(distances: Tensor) -> float:
    """Mean of the off-diagonal upper triangle of ``(E, E)`` distances; NaN for ``E < 2``."""
    num = distances.shape[0]
    if num < 2:
        return math.nan
    i, j = torch.triu_indices(num, num, offset=1)
    return float(distances[i, j].mean())


def expert_redundancy(
    lora_A: Tensor, lora_B: Tensor, scaling: float = 1.0, *, method: str = "auto"
) -> float:
    """MoLA's redundancy measure: the mean pairwise ``||dW_i - dW_j||_F`` (NaN for one expert).

    Lower means more redundant experts; identical experts give 0.
    """
    return mean_pairwise(pairwise_expert_distances(lora_A, lora_B, scaling, method=method))


@dataclass
class ModuleRedundancy:
    """The experts of one adapted module compared by their weights.

    Attributes:
        distances: ``(E, E)`` pairwise ``||dW_i - dW_j||_F``.
        norms: ``(E,)`` ``||dW_e||_F``.
    """

    distances: Tensor
    norms: Tensor

    @property
    def redundancy(self) -> float:
        """Mean pairwise distance (NaN for a single expert)."""
        return mean_pairwise(self.distances)


def module_redundancy(layer: MolaLinear, *, method: str = "auto") -> ModuleRedundancy:
    """Pairwise distances and norms of one :class:`~mola.layer.MolaLinear`'s expert updates,
    ``dW_e = scaling * B_e A_e`` as its structure defines them (:meth:`Experts.factors`)."""
    a, b = layer.experts.factors()
    return ModuleRedundancy(
        pairwise_expert_distances(a, b, layer.scaling, method=method),
        expert_update_norms(a, b, layer.scaling),
    )


def redundancy_stats(
    model: MolaModel, *, method: str = "auto"
) -> dict[tuple[int, str], ModuleRedundancy]:
    """``{(layer, module key): ModuleRedundancy}`` for every adapted module (weights only)."""
    keys = module_keys(model)
    out: dict[tuple[int, str], ModuleRedundancy] = {}
    with torch.no_grad():
        for name, layer in model.mola_layers():
            idx = -1 if layer.layer_idx is None else layer.layer_idx
            out[(idx, keys[name])] = module_redundancy(layer, method=method)
    return out
