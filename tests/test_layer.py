"""The fast dense-gated MolaLinear against the per-expert oracle: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_forward
from torch import nn
from transformers.pytorch_utils import Conv1D

from mola import MolaLinear
from mola.experts.fastpath import DroppedLinear, dropout_mask

SHAPES = [(7, 5), (16, 33), (33, 16)]
CASES = [(E, k) for E in (1, 2, 3, 8) for k in sorted({1, 2, E}) if k <= E]


def make_layer(d_in, d_out, E, k, router="topk", top_p=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=True).to(dtype)
    layer = MolaLinear(
        base, E, r=4, lora_alpha=8, lora_dropout=0.0, top_k=k, router=router, top_p=top_p
    ).to(dtype)  # a bf16 base gets fp32 adapters; these tests run the layer all in ``dtype``
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        if layer.router is not None:  # one expert: a plain LoRA, no router
            layer.router.weight.mul_(3.0)  # spread the router so top-k has no near-ties
    return layer


def grads(layer, x, out):
    torch.manual_seed(1)
    upstream = torch.randn_like(out)
    params = [x, layer.lora_A, layer.lora_B]
    if layer.router is not None:
        params.append(layer.router.weight)
    return torch.autograd.grad(out, params, upstream)


@pytest.mark.parametrize("E,k", CASES)
@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_fast_path_matches_oracle_fp32(E, k, d_in, d_out, lead):
    layer = make_layer(d_in, d_out, E, k)
    x = torch.randn(*lead, d_in, requires_grad=True)
    fast = layer(x)
    ref = oracle_forward(layer, x, "topk", k)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for g_fast, g_ref in zip(grads(layer, x, fast), grads(layer, x, ref), strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "router,k,top_p",
    [
        ("switch", None, None),
        ("soft", None, None),
        ("topp", None, 0.5),
        ("topp", 2, 0.9),
        ("topp", 3, 0.3),
    ],
)
@pytest.mark.parametrize("E", [1, 3, 8])
def test_other_routers_match_oracle(router, k, top_p, E):
    if k is not None and k > E:
        pytest.skip("top_k above expert count")
    layer = make_layer(11, 9, E, k, router=router, top_p=top_p)
    x = torch.randn(2, 4, 11, requires_grad=True)
    fast = layer(x)
    ref = oracle_forward(layer, x, router, k, top_p)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for g_fast, g_ref in zip(grads(layer, x, fast), grads(layer, x, ref), strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("E,k", [(2, 1), (3, 2), (8, 2), (8, 8)])
def test_fast_path_matches_oracle_bf16(E, k):
    layer = make_layer(24, 17, E, k, dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16
    x = torch.randn(3, 4, 24, dtype=torch.bfloat16, requires_grad=True)
    fast = layer(x)
    ref = oracle_forward(layer, x, "topk", k)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref.float(), rtol=3e-2, atol=3e-2)
    for g_fast, g_ref in zip(grads(layer, x, fast), grads(layer, x, ref), strict=True):
        torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=5e-2, atol=5e-2)


def test_fresh_layer_is_bit_identical_to_base():
    torch.manual_seed(0)
    base = nn.Linear(19, 13)
    layer = MolaLinear(base, 4, r=8, lora_alpha=16, lora_dropout=0.1, top_k=2)
    x = torch.randn(3, 6, 19)
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer.lora_B, torch.zeros(4, 13, 8))


def test_shapes_names_and_init_statistics():
    torch.manual_seed(0)
    base = nn.Linear(256, 40)
    layer = MolaLinear(base, 6, r=4, lora_alpha=8, lora_dropout=0.0, top_k=2)
    assert layer.lora_A.shape == (6, 4, 256) and layer.lora_B.shape == (6, 40, 4)
    assert layer.router.weight.shape == (6, 256) and layer.router.bias is None
    assert layer.scaling == 2.0 and layer.base_layer is base
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["router.weight", "experts.lora_A", "experts.lora_B"]
    bound = 1 / 256**0.5  # kaiming-uniform(a=sqrt 5) on fan_in 256, as nn.Linear
    for w in (layer.lora_A, layer.router.weight):
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    # each expert is initialised independently
    assert not torch.equal(layer.lora_A[0], layer.lora_A[1])


def test_dropout_mask_is_shared_by_experts():
    """With dropout, the output is the per-expert formula applied to one dropped-out x."""
    layer = make_layer(64, 8, 4, 2)
    layer.lora_dropout = nn.Dropout(0.5)
    layer.train()
    x = torch.randn(10, 64)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = x * dropout_mask(x, 0.5) / 0.5
    gates, _ = layer.routing.route(layer.router_logits(x))  # the router sees x itself
    expected = layer.base_layer(x)
    for e in range(4):
        update = dropped @ layer.lora_A[e].T @ layer.lora_B[e].T
        expected = expected + gates[:, e, None] * layer.scaling * update
    torch.testing.assert_close(out, expected)
    layer.eval()  # no dropout in eval mode: the fused projection gives the oracle's output
    torch.testing.assert_close(layer(x), oracle_forward(layer, x, "topk", 2))


def test_conv1d_base_layer_matches_transposed_linear():
    torch.manual_seed(0)
    conv = Conv1D(nf=12, nx=20)  # weight stored (in, out)
    layer = MolaLinear(conv, 3, r=2, lora_alpha=4, top_k=2)
    assert (layer.in_features, layer.out_features) == (20, 12)
    assert layer.lora_A.shape == (3, 2, 20) and layer.lora_B.shape == (3, 12, 2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 20)
    torch.testing.assert_close(layer(x), oracle_forward(layer, x, "topk", 2))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"num_experts": 0, "top_k": 1}, "num_experts"),
        ({"num_experts": 2, "r": 0}, "r"),
        ({"num_experts": 2, "router": "nope"}, "router"),
    ],
)
def test_bad_layer_arguments(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        MolaLinear(nn.Linear(4, 4), **kwargs)


def test_unsupported_base_layer():
    with pytest.raises(ValueError, match="unsupported module type Embedding"):
        MolaLinear(nn.Embedding(4, 4), 2)


def test_no_python_loop_over_experts_in_forward_graph():
    """Autograd graph size does not grow with E: the hot path is E-independent."""

    def count_nodes(E):
        layer = make_layer(16, 16, E, 1)
        out = layer(torch.randn(4, 16, requires_grad=True)).sum()
        seen, stack = set(), [out.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
        return len(seen)

    assert count_nodes(2) == count_nodes(8)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dropped_linear_matches_autograd_of_plain_dropout(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(7, 13, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 13, dtype=dtype, requires_grad=True)
    keep = dropout_mask(x, 0.3)
    assert keep.dtype == torch.bool and 0.5 < keep.float().mean() < 0.9
    fast = DroppedLinear.apply(x, w, keep, 1 / 0.7)
    plain = nn.functional.linear(x * keep / 0.7, w)
    torch.testing.assert_close(fast, plain, rtol=tol, atol=tol)
    upstream = torch.randn_like(fast)
    for a, b in zip(
        torch.autograd.grad(fast, (x, w), upstream),
        torch.autograd.grad(plain, (x, w), upstream),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
