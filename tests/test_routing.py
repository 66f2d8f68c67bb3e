"""Routers and the auxiliary losses, with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from mola import build_router, load_balancing_loss, router_z_loss


def test_topk_gates_renormalised_and_sparse():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]))
    gates, mask = build_router("topk", 4, top_k=2).route(logits)
    torch.testing.assert_close(gates[0], torch.tensor([0, 0, 3 / 7, 4 / 7]))
    assert mask[1].tolist() == [True, True, False, False] or mask[1].sum() == 2
    torch.testing.assert_close(gates.sum(-1), torch.ones(2))


def test_switch_keeps_raw_probability():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    gates, mask = build_router("switch", 3).route(logits)
    torch.testing.assert_close(gates, torch.tensor([[0.0, 0.6, 0.0]]))
    assert mask.tolist() == [[False, True, False]]


@pytest.mark.parametrize(
    "probs,top_p,top_k,selected",
    [
        ([0.6, 0.3, 0.1], 0.5, None, [1, 0, 0]),
        ([0.6, 0.3, 0.1], 0.8, None, [1, 1, 0]),
        ([0.6, 0.3, 0.1], 0.95, None, [1, 1, 1]),
        ([0.6, 0.3, 0.1], 0.95, 2, [1, 1, 0]),
        ([0.1, 0.3, 0.6], 0.7, None, [0, 1, 1]),
        ([0.34, 0.33, 0.33], 1.0, None, [1, 1, 1]),
    ],
)
def test_topp_dynamic_count(probs, top_p, top_k, selected):
    gates, mask = build_router("topp", 3, top_k=top_k, top_p=top_p).route(
        torch.log(torch.tensor([probs]))
    )
    assert mask[0].int().tolist() == selected
    p = torch.tensor(probs) * torch.tensor(selected)
    torch.testing.assert_close(gates[0], p / p.sum())


def test_soft_uses_every_expert():
    logits = torch.randn(5, 4)
    gates, mask = build_router("soft", 4).route(logits)
    torch.testing.assert_close(gates, torch.softmax(logits, -1))
    assert mask.all()


def test_routing_is_fp32_for_bf16_logits():
    gates, _ = build_router("topk", 4, top_k=2).route(torch.randn(3, 4, dtype=torch.bfloat16))
    assert gates.dtype == torch.float32


def reference_balance(logit_list, k, mask=None):
    """E * sum_i f_i P_i written with explicit loops."""
    rows = []
    for t in logit_list:
        flat = t.reshape(-1, t.shape[-1])
        keep = [True] * flat.shape[0] if mask is None else mask.reshape(-1).bool().tolist()
        rows.extend(r for r, ok in zip(flat, keep, strict=True) if ok)
    E = rows[0].shape[0]
    counts, psum = [0.0] * E, [0.0] * E
    for r in rows:
        p = torch.softmax(r.double(), -1)
        for e in torch.topk(p, k).indices.tolist():
            counts[e] += 1
        for e in range(E):
            psum[e] += p[e].item()
    total = sum(counts)
    return E * sum((counts[e] / total) * (psum[e] / len(rows)) for e in range(E))


@pytest.mark.parametrize("E,k,modules", [(2, 1, 1), (4, 2, 3), (8, 2, 7), (3, 3, 2)])
def test_balance_loss_matches_reference(E, k, modules):
    torch.manual_seed(E + k)
    logits = [torch.randn(2, 5, E) for _ in range(modules)]
    got = load_balancing_loss(logits, build_router("topk", E, top_k=k))
    assert got.item() == pytest.approx(reference_balance(logits, k), rel=1e-5)


def test_balance_loss_excludes_padding():
    torch.manual_seed(0)
    logits = [torch.randn(2, 4, 4) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    router = build_router("topk", 4, top_k=2)
    got = load_balancing_loss(logits, router, mask)
    assert got.item() == pytest.approx(reference_balance(logits, 2, mask), rel=1e-5)
    # changing logits at padded positions changes nothing
    logits[0][1, 3] = 100.0
    assert load_balancing_loss(logits, router, mask).item() == pytest.approx(got.item())


def test_balance_loss_known_values():
    router = build_router("topk", 4, top_k=1)
    uniform = [torch.zeros(10, 4)]  # ties: f concentrates, P uniform -> E * 1 * 1/4 = 1
    assert load_balancing_loss(uniform, router).item() == pytest.approx(1.0)
    collapsed = [torch.tensor([[20.0, 0, 0, 0]]).repeat(6, 1)]  # all to expert 0, P_0 ~ 1
    assert load_balancing_loss(collapsed, router).item() == pytest.approx(4.0, rel=1e-6)


def test_balance_loss_has_router_gradient():
    logits = torch.randn(8, 4, requires_grad=True)
    load_balancing_loss([logits], build_router("topk", 4, top_k=2)).backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_known_value():
    logits = [torch.zeros(3, 4), torch.zeros(2, 4)]
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)


def test_mask_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="attention_mask has 6 tokens"):
        load_balancing_loss([torch.randn(4, 2)], build_router("topk", 2, top_k=1), torch.ones(2, 3))


@pytest.mark.parametrize(
    "args,message",
    [
        (("topk", 2, 3, None), "^top_k: 3 is not in 1..2"),
        (("topk", 2, None, None), "^top_k: the 'topk' router needs top_k"),
        (("topp", 2, 1, 0.0), "^top_p:"),
        (("what", 2, 1, None), "^router: unknown router 'what'"),
        (("topk", 0, 1, None), "^num_experts: must be >= 1"),
    ],
)
def test_bad_router_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        build_router(*args)
