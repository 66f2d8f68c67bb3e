"""The learned and dynamic routers against oracles written from each paper's formula.

Every oracle works token by token and expert by expert with plain Python control flow (sorting
Python floats, explicit sums); only the arithmetic stays in torch so gradients can be compared.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import build
from torch import nn

from mola import MolaConfig, MolaLinear, MolaModel, get_mola_model
from mola.routing import ROUTERS, build_router

LEARNED = ["ldmole", "dynmole", "adamole", "relu"]


def make_layer(router, E, k=2, d_in=11, d_out=9, dtype=torch.float32, seed=0, **options):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(dtype)
    top_k = min(k, E) if k else None
    layer = MolaLinear(
        base, E, r=3, lora_alpha=6, top_k=top_k, router=router, top_p=0.75, router_options=options
    ).to(dtype)  # a bf16 base gets fp32 adapters; these tests run the layer all in ``dtype``
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        layer.router.weight.mul_(4.0)  # spread the logits: few near-ties at selection edges
    return layer


def sparsemax(u):
    """Sparsemax of a 1-D tensor: the support from sorted Python floats, tau in torch."""
    values = sorted(u.tolist(), reverse=True)
    k, total = 1, 0.0
    for j, v in enumerate(values, start=1):
        total += v
        if 1 + j * v > total:
            k = j
    order = torch.argsort(u, descending=True)[:k]
    tau = (u[order].sum() - 1) / k
    return torch.clamp(u - tau, min=0.0)


def oracle_gates(layer, x_row):
    """Gates of one token ``x_row (d_in,)`` by the router's paper formula."""
    router = layer.router
    z = (router.weight.float() @ x_row.float()).reshape(-1)
    E = z.shape[0]
    if router.name == "ldmole":
        mlp = router.lambda_mlp
        h = torch.relu(mlp.hidden_weight.float() @ x_row.float() + mlp.hidden_bias.float())
        lam = F.logsigmoid(mlp.out_weight.float() @ h + mlp.out_bias.float())[0] + 0.99
        return sparsemax(z / (1 - lam))  # argmin ||p - z||^2 - lam ||p||^2 on the simplex
    if router.name == "relu":
        return torch.stack([torch.clamp(z[e], min=0.0) for e in range(E)])
    p = torch.softmax(z, dim=-1)
    if router.name == "adamole":
        t = router.threshold_weight.float() @ x_row.float() + router.threshold_bias.float()
        tau = torch.sigmoid(t[0]) * (1.0 / E)
        used = [e for e in range(E) if p[e].item() >= tau.item()]
        total = sum(p[e] - tau for e in used)
        return torch.stack([(p[e] - tau) / total if e in used else p[e] * 0 for e in range(E)])
    if router.name == "dynmole":
        q, eps = 1.1, 1e-5
        if E == 1:
            entropy = 0.0
        else:
            s = (1 - sum((pi + eps) ** q for pi in p.tolist())) / (q - 1)
            entropy = s / ((1 - E ** (1 - q)) / (q - 1))
        order = sorted(range(E), key=lambda e: -p[e].item())
        used, mass = set(), 0.0
        for rank, e in enumerate(order):
            mass += p[e].item()
            if rank < layer.router.top_k or mass <= 0.75:
                used.add(e)
        if entropy > 0.9:
            used = set(range(E))
        return torch.stack([p[e] if e in used else p[e] * 0 for e in range(E)])
    raise ValueError(router.name)


def oracle_forward(layer, x):
    flat = x.reshape(-1, layer.in_features)
    rows = []
    for n in range(flat.shape[0]):
        g = oracle_gates(layer, flat[n])
        y = torch.zeros(layer.out_features)
        for e in range(layer.num_experts):
            a, b = layer.lora_A[e].float(), layer.lora_B[e].float()
            y = y + g[e] * layer.scaling * (b @ (a @ flat[n].float()))
        rows.append(y)
    base = layer.base_layer(x)
    return base + torch.stack(rows).view(*x.shape[:-1], -1).to(base.dtype)


def grads(layer, x, out):
    torch.manual_seed(1)
    params = [x, layer.lora_A, layer.lora_B] + [p for _, p in layer.router.named_parameters()]
    return torch.autograd.grad(out, params, torch.randn_like(out), allow_unused=True)


def assert_grads_close(layer, x, fast, ref, tol):
    for a, b in zip(grads(layer, x, fast), grads(layer, x, ref), strict=True):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("router", LEARNED)
@pytest.mark.parametrize("E", [2, 3, 8])  # one expert is a plain LoRA, without a router
@pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["2d", "3d"])
def test_router_matches_paper_oracle_fp32(router, E, lead):
    layer = make_layer(router, E)
    x = torch.randn(*lead, 11, requires_grad=True)
    fast = layer(x)
    ref = oracle_forward(layer, x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(layer, x, fast, ref, 1e-4)


@pytest.mark.parametrize("router", LEARNED)
@pytest.mark.parametrize("E", [3, 8])
def test_router_matches_paper_oracle_bf16(router, E):
    layer = make_layer(router, E, d_in=24, d_out=17, dtype=torch.bfloat16, seed=2)
    x = torch.randn(3, 4, 24, dtype=torch.bfloat16, requires_grad=True)
    fast = layer(x)
    assert fast.dtype == torch.bfloat16
    ref = oracle_forward(layer, x)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=4e-2, atol=4e-2)


def test_sparsegen_properties_and_dynamic_count():
    layer = make_layer("ldmole", 8, seed=3)
    x = torch.randn(64, 11)
    with torch.no_grad():
        routing = layer.router.gate(F.linear(x, layer.router.fused_weight()), x)
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(64))
    assert (routing.active >= 1).all(), "sparsegen keeps at least one expert per token"
    assert (routing.extras["lambda"] < 1).all()
    assert len(set(routing.active.tolist())) > 1, "the number of experts varies per token"


def test_relu_router_allows_zero_experts():
    layer = make_layer("relu", 4, seed=0)
    with torch.no_grad():
        layer.router.weight.copy_(-layer.router.weight.abs())
    x = torch.randn(5, 11).abs()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_adamole_threshold_keeps_the_top_expert():
    layer = make_layer("adamole", 6, seed=4)
    x = torch.randn(50, 11)
    with torch.no_grad():
        routing = layer.router.gate(F.linear(x, layer.router.fused_weight()), x)
    assert (routing.active >= 1).all()
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(50))
    assert (routing.extras["threshold"] < 1 / 6).all()


# ------------------------------------------------------------------------------------ losses


def records_of(layer, x):
    with torch.no_grad():
        return [layer.router.gate(F.linear(x, layer.router.fused_weight()), x)]


def test_ldmole_losses_match_the_formulas():
    layer = make_layer("ldmole", 5, k=2, seed=5)
    x = torch.randn(12, 11)
    (rec,) = records_of(layer, x)
    losses = layer.router.layer_losses([rec])
    g = rec.gates
    counts = (g > 0).float().sum(0)
    expected = 5 * sum((counts[i] / counts.sum()) * g[:, i].mean() for i in range(5))
    assert losses["aux_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms = []
    for n in range(12):
        u = sorted(rec.logits[n].tolist(), reverse=True)
        bound = 1 - (u[0] + u[1] - 2 * u[2])
        terms.append(max(bound - rec.extras["lambda"][n].item(), 0.0))
    assert losses["sparsity_loss"].item() == pytest.approx(sum(terms) / 12, rel=1e-5, abs=1e-7)


def test_dynmole_losses_match_the_formulas():
    layer = make_layer("dynmole", 4, seed=6)
    x = torch.randn(10, 11)
    (rec,) = records_of(layer, x)
    losses = layer.router.layer_losses([rec])
    p = torch.softmax(rec.logits, -1)
    expected = 4 * sum(rec.gates[:, i].mean() * p[:, i].mean() for i in range(4))
    assert losses["aux_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    q = 1.1
    ent = [(1 - sum((v + 1e-5) ** q for v in row)) / (1 - 4 ** (1 - q)) for row in p.tolist()]
    assert losses["entropy_loss"].item() == pytest.approx(sum(ent) / 10, rel=1e-5)


def test_relu_l1_loss_matches_the_formula_and_skips_padding():
    layer = make_layer("relu", 4, k=2, seed=7)
    x = torch.randn(2, 6, 11)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    (rec,) = records_of(layer, x.reshape(-1, 11))
    got = layer.router.layer_losses([rec], mask)["l1_loss"].item()
    keeps = mask.reshape(-1).tolist()
    rows = [r for r, keep in zip(rec.gates.tolist(), keeps, strict=True) if keep]
    expected = 0.0
    for e in range(4):
        active = sum(1 for r in rows if r[e] > 0)
        expected += (4 / (2 * len(rows))) * active * (sum(r[e] for r in rows) / len(rows))
    assert got == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------ models, checkpoints


@pytest.mark.parametrize("router", LEARNED)
def test_learned_router_trains_logs_losses_and_round_trips(router, tmp_path):
    base, _, _ = build("llama")
    cfg = MolaConfig(
        num_experts=[2, 4], top_k=1, router=router, top_p=0.75, lora_dropout=0.0,
        sparsity_loss_coef=0.1, entropy_loss_coef=0.01, l1_loss_coef=0.01,
    )  # fmt: skip
    model = get_mola_model(base, cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or ".router." in n for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    ids = torch.randint(3, 97, (2, 7))
    out = model(input_ids=ids, labels=ids)
    expected = out.lm_loss
    for name in model.loss_names:
        assert name in out and torch.isfinite(out[name])
        expected = expected + cfg.loss_coef(name) * out[name]
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "router" in n)  # fmt: skip
    model.save_pretrained(tmp_path)
    loaded = MolaModel.from_pretrained(build("llama")[0], tmp_path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.mola_config == model.mola_config  # ldmole_hidden resolved by model size


def test_ldmole_lambda_mlp_is_shared_across_modules():
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=3, router="ldmole", ldmole_hidden=8))
    layers = [layer for _, layer in model.mola_layers()]
    hidden = {id(layer.router.lambda_mlp) for layer in layers if layer.in_features == 32}
    assert len(hidden) == 1 and len({id(layer.router.lambda_mlp) for layer in layers}) == 2
    own = get_mola_model(
        build("llama")[0], MolaConfig(num_experts=3, router="ldmole", ldmole_share=False)
    )
    assert len({id(layer.router.lambda_mlp) for _, layer in own.mola_layers()}) == 28


def test_block_scope_with_a_learned_router():
    base, _, _ = build("llama")
    cfg = MolaConfig(num_experts=3, top_k=1, router="adamole", router_scope="block")
    model = get_mola_model(base, cfg)
    ids = torch.randint(3, 97, (2, 5))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    mlp = model.base_model.model.layers[0].mlp
    assert mlp.router.threshold_weight.grad is not None


def test_every_router_is_described():
    for name, cls in ROUTERS.items():
        assert cls.description and cls.paper, name
    with pytest.raises(ValueError, match="ldmole_hidden: must be >= 1"):
        build_router("ldmole", 3, 1, None, 4, ldmole_hidden=0)
    assert math.isclose(build_router("adamole", 4, in_features=3).max_threshold, 0.25)


# ------------------------------------------------------------------------ LoRAMoE constraint


def test_loramoe_localized_balance_matches_the_formula():
    torch.manual_seed(8)
    E, B, T = 5, 3, 4
    router = build_router("loramoe", E, in_features=7, lbc_groups=2, lbc_delta=0.1)
    x = torch.randn(B * T, 7)
    (rec,) = [router.gate(F.linear(x, router.fused_weight()), x)]
    torch.testing.assert_close(rec.gates, torch.softmax(rec.logits.float(), -1))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    group = torch.tensor([0, 1, -1])
    got = router.layer_losses([rec], mask, {"group": group})["lbc_loss"].item()
    owner = [1, 1, 1, 0, 0]  # as the authors' code: type 1 -> the first experts, type 0 the rest
    z = []
    for n in range(B):
        for e in range(E):
            q = sum(rec.gates[n * T + t, e].item() for t in range(T) if mask[n, t])
            if group[n] < 0:
                coef = 1.0
            else:
                coef = 1.1 if owner[e] == group[n] else 0.9
            z.append(coef * q)
    mean = sum(z) / len(z)
    var = sum((v - mean) ** 2 for v in z) / (len(z) - 1)  # cv_squared: torch's unbiased var
    assert got == pytest.approx(var / (mean**2 + 1e-10), rel=1e-5)


def test_loramoe_without_mask_or_groups_takes_each_example_as_a_row():
    base, _, _ = build("llama")
    cfg = MolaConfig(num_experts=4, router="loramoe", lbc_loss_coef=1.0, target_modules=["up_proj"])
    model = get_mola_model(base, cfg)
    ids = torch.randint(3, 97, (3, 5))
    plain = model(input_ids=ids, labels=ids).lbc_loss
    masked = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).lbc_loss
    torch.testing.assert_close(plain, masked)
    # scale-invariant: the squared coefficient of variation does not change with the gate scale
    from mola.routing.loramoe import cv_squared

    z = torch.rand(3, 4)
    torch.testing.assert_close(cv_squared([z]), cv_squared([5 * z]))


def test_group_field_reaches_the_loss(tmp_path):
    from mola.data.datasets import DataError, load_file
    from mola.data.prompts import DataCollator

    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instruction": "a", "output": "b", "group": 1}\n{"instruction": "c", "output": "d"}\n'
    )
    examples = load_file(path)
    assert [e.group for e in examples] == [1, None]
    batch = DataCollator(0)([{"input_ids": [5, 6], "group": 1}, {"input_ids": [7]}])
    assert batch["group"].tolist() == [1, -1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b", "group": "x"}\n')
    with pytest.raises(DataError, match="field 'group' must be an integer"):
        load_file(bad)
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=4, router="loramoe", lbc_loss_coef=0.5))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router" in n:
                p.mul_(5.0)
    ids = torch.randint(3, 97, (2, 6))
    typed = model(input_ids=ids, labels=ids, group=torch.tensor([0, 1]))
    plain = model(input_ids=ids, labels=ids)
    assert typed.lbc_loss.item() != pytest.approx(plain.lbc_loss.item())
    torch.testing.assert_close(
        typed.loss, typed.lm_loss + 0.001 * typed.aux_loss + 0.5 * typed.lbc_loss
    )


@pytest.mark.parametrize("router", ["ldmole", "adamole"])
def test_inference_cache_follows_the_routers_extra_rows(router):
    layer = make_layer(router, 4).eval()
    x = torch.randn(6, 11)
    with torch.inference_mode():
        first = layer(x)
        again = layer(x)
    assert torch.equal(first, again) and layer._fused_a.builds == 1
    extra = layer.router.lambda_mlp.hidden_weight if router == "ldmole" else None
    extra = layer.router.threshold_weight if extra is None else extra
    with torch.no_grad():
        extra.mul_(-3.0)  # an in-place change of an extra row: the cache must rebuild
        changed = layer(x)
    assert layer._fused_a.builds == 2
    torch.testing.assert_close(changed, oracle_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_routers_mixed_by_module_patterns_report_every_loss():
    from test_distributed_routers import PATTERNS

    base, targets, _ = build("llama")
    cfg = MolaConfig(target_modules=targets, num_experts=3, top_k=1, module_patterns=PATTERNS)
    model = get_mola_model(base, cfg)
    names = ["aux_loss", "router_z_loss", "l1_loss", "sparsity_loss", "entropy_loss", "lbc_loss"]
    assert model.loss_names == names
    ids = torch.randint(0, 97, (2, 8))
    out = model(input_ids=ids, labels=ids, group=torch.tensor([0, 1]))
    assert all(torch.isfinite(out[n]) for n in names)
    assert out.l1_loss > 0 and out.lbc_loss > 0
