"""Every expert structure's fast path against its paper's formula, token by token, expert by
expert: outputs and gradients, plus init, parameter counts and effective updates."""

from __future__ import annotations

import pytest
import torch

from mola.experts import STRUCTURES, StructureOptions
from mola.experts.rankwise import top_mask

D_IN, D_OUT = 13, 11
RANK_WISE = {"rankwise", "flylora"}


def make(structure, E=3, r=4, k=2, seed=0, **opts):
    torch.manual_seed(seed)
    num = r if structure in RANK_WISE else E
    experts = STRUCTURES[structure](
        D_IN, D_OUT, num, r, 8.0, StructureOptions(top_k=k, **opts), dtype=torch.float64
    )
    with torch.no_grad():  # a trained-looking B (it starts at zero)
        for name, p in experts.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return experts


def random_gates(n, e, seed=3):
    torch.manual_seed(seed)
    g = torch.rand(n, e, dtype=torch.float64)
    g[torch.rand(n, e) < 0.4] = 0.0  # some experts unused, as after top-k
    return g


def oracle(experts, x, gates):
    """``sum_e g_e dW_e x`` per token, from each paper's formula (never the fast path)."""
    s, rows = experts.scaling, []
    for t in range(x.shape[0]):
        y = torch.zeros(D_OUT, dtype=x.dtype)
        for e in range(gates.shape[1]):
            g = gates[t, e]
            if experts.structure == "stacked":  # MoLA: B_e A_e x
                y = y + g * s * (experts.lora_B[e] @ (experts.lora_A[e] @ x[t]))
            elif experts.structure == "shared_a":  # HydraLoRA: B_e A x
                y = y + g * s * (experts.lora_B[e] @ (experts.lora_A @ x[t]))
            elif experts.structure in RANK_WISE:  # SMoRA / FlyLoRA: b_i a_i^T x
                y = y + g * s * experts.lora_B[:, e] * (experts.lora_A[e] @ x[t])
        if experts.structure == "core":  # CoMoL: B (sum_e g_e C_e) A x
            merged = sum(gates[t, e] * experts.lora_C[e] for e in range(gates.shape[1]))
            y = s * (experts.lora_B @ (merged @ (experts.lora_A @ x[t])))
        rows.append(y)
    return torch.stack(rows)


def trained(experts):
    return [p for p in experts.parameters() if p.requires_grad]


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("E,r", [(1, 1), (3, 4), (8, 2)])
def test_fast_path_matches_formula(structure, E, r):
    experts = make(structure, E=E, r=r, k=1)
    torch.manual_seed(5)
    x = torch.randn(9, D_IN, dtype=torch.float64, requires_grad=True)
    gates = random_gates(9, experts.num_experts)
    fast = experts.delta(x, gates)
    ref = oracle(experts, x, gates)
    torch.testing.assert_close(fast, ref)
    upstream = torch.randn_like(fast)
    params = [x, *trained(experts)]
    for gf, gr in zip(
        torch.autograd.grad(fast, params, upstream),
        torch.autograd.grad(ref, params, upstream),
        strict=True,
    ):
        torch.testing.assert_close(gf, gr)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_factors_are_the_effective_updates(structure):
    experts = make(structure)
    a, b = experts.factors()
    x = torch.randn(5, D_IN, dtype=torch.float64)
    for e in range(experts.num_experts):
        gates = torch.zeros(5, experts.num_experts, dtype=torch.float64)
        gates[:, e] = 1.0
        want = experts.delta(x, gates)
        torch.testing.assert_close(x @ (experts.scaling * b[e] @ a[e]).T, want)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_fresh_update_is_exactly_zero(structure):
    torch.manual_seed(0)
    num = 4 if structure in RANK_WISE else 3
    experts = STRUCTURES[structure](D_IN, D_OUT, num, 4, 8.0, StructureOptions(top_k=2))
    x = torch.randn(6, D_IN)
    assert torch.equal(experts.delta(x, torch.rand(6, num)), torch.zeros(6, D_OUT))


def test_parameter_counts():
    counts = {}
    for structure in STRUCTURES:
        experts = STRUCTURES[structure](
            D_IN, D_OUT, 8 if structure in RANK_WISE else 4, 8, 16.0, StructureOptions(top_k=2)
        )
        counts[structure] = sum(p.numel() for p in trained(experts))
    print(counts)
    assert counts["stacked"] == 4 * 8 * (D_IN + D_OUT)
    assert counts["shared_a"] == 8 * D_IN + 4 * 8 * D_OUT
    assert counts["rankwise"] == 8 * (D_IN + D_OUT)
    assert counts["flylora"] == 8 * D_OUT  # A is frozen
    assert counts["core"] == 8 * (D_IN + D_OUT) + 4 * 8 * 8


def test_mosld_drops_entries_of_the_shared_a():
    experts = make("shared_a", a_dropout=0.5)
    experts.train()
    torch.manual_seed(0)
    w = experts.down_weight()
    kept = w != 0
    assert 0.3 < kept.double().mean() < 0.7
    torch.testing.assert_close(w[kept], experts.lora_A[kept] * 2.0)
    # the gradient reaches only the kept entries
    w.sum().backward()
    assert torch.equal(experts.lora_A.grad != 0, kept)
    experts.eval()
    assert experts.down_weight() is experts.lora_A


def test_flylora_frozen_sparse_a_and_implicit_router():
    experts = make("flylora", r=8, k=2)
    assert "lora_A" not in dict(experts.named_parameters())
    assert "lora_A" in dict(experts.named_buffers())
    nonzero = (experts.lora_A != 0).sum(dim=1)
    assert torch.equal(nonzero, torch.full((8,), D_IN // (8 // 2)))  # the authors' d // (r // k)
    x = torch.randn(6, D_IN, dtype=torch.float64)
    h = x @ experts.lora_A.T
    experts.eval()
    gates = experts.implicit_gates(h)
    assert torch.equal(gates.bool(), top_mask(h.abs(), 2))
    assert torch.equal(experts.lora_balance_bias, torch.zeros(8))  # no update in eval


def test_balance_bias_moves_toward_the_mean_load():
    experts = make("flylora", r=4, k=1, balance_bias_rate=0.5)
    experts.train()
    h = torch.tensor([[5.0, 0.1, 0.1, 0.1]] * 3 + [[0.1, 4.0, 0.1, 0.1]], dtype=torch.float64)
    experts.implicit_gates(h)  # loads 3, 1, 0, 0; mean 1
    assert experts.lora_balance_pending.tolist() == [-0.5, 0.0, 0.5, 0.5]  # the next forward's
    assert experts.balance_bias().tolist() == [-0.5, 0.0, 0.5, 0.5]
    assert experts.lora_balance_pending.abs().sum() == 0


def test_smora_biased_selection_keeps_unbiased_gates():
    experts = make("rankwise", r=4, k=2, balance_bias_rate=0.1, smora_gating="softmax")
    with torch.no_grad():
        experts.lora_balance_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    experts.eval()
    logits = torch.tensor([[3.0, 2.0, 0.0, 1.0]])
    gates, mask = experts.route_biased(logits)
    assert mask.tolist() == [[True, False, True, False]]  # rank 2 forced in by its bias
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(gates[0, [0, 2]], p[[0, 2]] / p[[0, 2]].sum())
