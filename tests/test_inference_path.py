"""The no-grad (inference) path of the default configuration: the fused top-k gate, the lazy
selection mask, the LoRA scale folded into the cached up-projection, the in-place update.

Every result is compared with the per-expert oracle and with the path gradients take."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_forward
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mola import MolaLinear
from mola.experts import STRUCTURES
from mola.routing import Routing, build_router
from mola.routing.base import keep, topk_gates, topk_mask


def reference_gates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """MoLA's written rule: the renormalised top-k of ``softmax(logits)`` in fp32."""
    probs = torch.softmax(logits.float(), dim=-1)
    return keep(probs, topk_mask(probs, k), renorm=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
@pytest.mark.parametrize("E,k", [(2, 1), (4, 2), (8, 2), (8, 3), (8, 8)])
def test_fused_topk_gate_equals_renormalised_softmax(E, k, dtype, tol):
    torch.manual_seed(E * 10 + k)
    logits = (3 * torch.randn(64, E)).to(dtype).requires_grad_()
    fused, indices = topk_gates(logits, k)
    ref = reference_gates(logits, k)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=tol, atol=tol)
    assert torch.equal(torch.zeros_like(fused, dtype=torch.bool).scatter_(-1, indices, True),
                       ref > 0)  # fmt: skip
    upstream = torch.randn(64, E)
    (g_fused,) = torch.autograd.grad(fused, logits, upstream)
    (g_ref,) = torch.autograd.grad(ref, logits, upstream)
    torch.testing.assert_close(g_fused.float(), g_ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "row",
    [
        [0.0, 0.0, 0.0, 0.0],  # all tied
        [1.0, 2.0, 2.0, 0.5],  # a tie inside the top 2
        [2.0, 1.0, 1.0, 1.0],  # a tie at the boundary
        [-1e4, 5.0, 5.0, -1e4],
        [30.0, -30.0, 29.0, 0.0],  # probabilities down to 1e-26
        [float("-inf"), 1.0, float("-inf"), 0.0],
    ],
)
def test_topk_of_logits_selects_what_topk_of_probabilities_selects(row):
    logits = torch.tensor([row, row[::-1]])
    probs = torch.softmax(logits, dim=-1)
    for k in (1, 2, 3):
        fused, indices = topk_gates(logits, k)
        assert torch.equal(indices.sort(-1).values, probs.topk(k, -1).indices.sort(-1).values)
        torch.testing.assert_close(fused, reference_gates(logits, k), rtol=1e-6, atol=1e-7)


def test_routing_mask_is_built_only_when_read():
    router = build_router("topk", 5, top_k=2, in_features=7)
    x = torch.randn(6, 7)
    routing = router.gate(nn.functional.linear(x, router.fused_weight()), x)
    assert routing._mask is None  # inference never builds it
    probs = torch.softmax(routing.logits, -1)
    assert torch.equal(routing.mask, topk_mask(probs, 2))
    assert routing.active.tolist() == [2] * 6
    # the other routers still pass a mask; one of the two is required
    explicit = Routing(routing.logits, routing.gates, routing.mask, {"x": x})
    assert explicit.mask is routing.mask and explicit.extras["x"] is x
    with pytest.raises(ValueError, match="mask or the selected indices"):
        Routing(routing.logits, routing.gates)
    gates, mask = router.route(routing.logits)
    assert torch.equal(gates, routing.gates) and torch.equal(mask, routing.mask)


def make_layer(E, k, d_in=24, d_out=20, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MolaLinear(nn.Linear(d_in, d_out), E, r=4, lora_alpha=12, top_k=k, **kw).to(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        if layer.router is not None:
            layer.router.weight.mul_(3.0)  # no near-ties in the top-k
    return layer.eval()


@pytest.mark.parametrize("E,k", [(1, 1), (2, 1), (4, 2), (8, 2), (8, 8)])
@pytest.mark.parametrize("lead", [(1, 1), (3, 5)], ids=["one-token", "batch"])
def test_no_grad_path_equals_oracle_and_grad_path(E, k, lead):
    layer = make_layer(E, k)
    x = torch.randn(*lead, 24)
    with torch.enable_grad():
        graph = layer(x)
    assert graph.requires_grad
    with torch.no_grad():
        fast = layer(x)
    with torch.inference_mode():
        again = layer(x)
    torch.testing.assert_close(fast, graph.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast, oracle_forward(layer, x, "topk", k), rtol=1e-5, atol=1e-5)
    assert torch.equal(again, fast)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_no_grad_path_equals_grad_path_for_every_structure(structure):
    layer = make_layer(4, 2, experts_structure=structure)  # rank-wise: E = r = 4
    x = torch.randn(2, 3, 24)
    with torch.enable_grad():
        graph = layer(x).detach()
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, graph, rtol=1e-6, atol=1e-6)


def test_bf16_no_grad_path_equals_grad_path():
    layer = make_layer(8, 2, dtype=torch.bfloat16)
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    with torch.enable_grad():
        graph = layer(x).detach()
    with torch.no_grad():
        fast = layer(x)
    # the scale is folded into B (bf16 rounding of scaling * B): a few bf16 ulps
    torch.testing.assert_close(fast.float(), graph.float(), rtol=2e-2, atol=2e-2)


class OpLog(TorchDispatchMode):
    """Names of the aten ops that run (below autograd: the kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_one_token_no_grad_forward_runs_only_the_needed_kernels():
    layer = make_layer(8, 2, d_in=16, d_out=16)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        layer(x)  # builds the cached weights
        with OpLog() as log:
            layer(x)
    views = ("view", "t", "slice", "unsqueeze", "_unsafe_view", "transpose", "reshape")
    compute = [op.split(".")[0] for op in log.ops if op.split(".")[0] not in views]
    # the base layer's addmm (it has a bias), the fused [router; A] mm, the gate (topk, zeros,
    # softmax of the k values, scatter), the gated columns, the update added in place
    assert compute == ["addmm", "mm", "topk", "zeros", "_softmax", "scatter_", "mul", "addmm_"]
