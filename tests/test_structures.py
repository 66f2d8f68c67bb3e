"""Expert structures inside a model: a fresh adapter equals its base model, checkpoints round trip
(frozen buffers included), the layer's routing matches each paper's formula, per-module patterns,
and a single expert without a router is PEFT's LoRA."""

from __future__ import annotations

import pytest
import torch
from models import build
from peft import LoraConfig, get_peft_model
from torch import nn

from mola import MolaConfig, MolaLinear, MolaModel, get_mola_model
from mola.experts import STRUCTURES, StructureOptions

CONFIGS = {
    "stacked": dict(num_experts=3, r=4, top_k=2),
    "shared_a": dict(experts_structure="shared_a", num_experts=3, r=4, router="soft"),
    "mosld": dict(experts_structure="shared_a", num_experts=3, r=4, top_k=2, a_dropout=0.2),
    "rankwise": dict(experts_structure="rankwise", r=8, top_k=2, aux_loss_coef=0.0),
    "flylora": dict(experts_structure="flylora", r=8, top_k=2, lora_dropout=0.0),
    "core": dict(experts_structure="core", num_experts=4, r=4, top_k=2),
}


def perturb(model, seed=1):
    """Make the adapter's update visible (B starts at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(std=0.3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fresh_equals_base_and_round_trip(name, tmp_path):
    base, targets, _ = build("llama")
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = get_mola_model(base, MolaConfig(target_modules=targets, **CONFIGS[name])).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    trainable, total = model.num_parameters_split()
    print(f"{name}: {trainable:,d} trainable parameters")
    # train a step so the routers, biases and B all move
    model.train()
    ids_train = torch.randint(0, 97, (4, 9))
    out = model(input_ids=ids_train, labels=ids_train)
    out.loss.backward()
    perturb(model)
    model.eval()
    with torch.no_grad():
        mine = model(input_ids=ids).logits
    assert not torch.equal(mine, want)
    model.save_pretrained(tmp_path)
    again = MolaModel.from_pretrained(build("llama")[0], tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, mine, rtol=0, atol=0)
    for (n1, t1), (n2, t2) in zip(
        sorted(model.adapter_state_dict().items()),
        sorted(again.adapter_state_dict().items()),
        strict=True,
    ):
        assert n1 == n2 and torch.equal(t1, t2)


def test_flylora_trains_only_b_and_saves_its_frozen_a(tmp_path):
    base, targets, _ = build("llama")
    model = get_mola_model(base, MolaConfig(target_modules=targets, **CONFIGS["flylora"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("experts.lora_B") for n in names)
    assert not any("router" in n for n, _ in model.named_parameters())
    saved = model.adapter_state_dict()
    assert any(n.endswith("mlp.down_proj.lora_A") for n in saved)
    assert any(n.endswith("lora_balance_bias") for n in saved)
    model.train()
    ids = torch.randint(0, 97, (4, 9))
    model(input_ids=ids, labels=ids).loss.backward()  # the balancing bias moves in training
    model(input_ids=ids, labels=ids)  # (each forward's step is added before the next forward)
    layer = next(layer for _, layer in model.mola_layers())
    assert layer.experts.lora_balance_bias.abs().sum() > 0


def oracle_layer(layer: MolaLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer from the formulas, token by token: CoMoL routes on A x, SMoRA ranks p + b."""
    experts, out = layer.experts, layer.base_layer(x)
    rows = []
    for t in range(x.shape[0]):
        if experts.structure == "core":
            h = experts.lora_A @ x[t]
            p = torch.softmax(layer.router.weight @ h, -1)
            chosen = p.topk(layer.router.top_k).indices
            merged = sum(p[e] / p[chosen].sum() * experts.lora_C[e] for e in chosen.tolist())
            rows.append(experts.scaling * experts.lora_B @ (merged @ h))
        elif experts.gating == "sigmoid":  # SMoRA's code: k * biased scores, alpha / k
            k = experts.top_k
            score = torch.sigmoid(layer.router.weight @ x[t]) + experts.lora_balance_bias
            chosen = score.topk(k).indices.tolist()
            gate = {i: k * score[i] / score[chosen].sum() for i in chosen}
            y = sum(gate[i] * experts.lora_B[:, i] * (experts.lora_A[i] @ x[t]) for i in chosen)
            rows.append(experts.lora_alpha / k * y)
        else:  # loss-free variant: select top-k of p + b, weigh by renormalised p, alpha / r
            p = torch.softmax(layer.router.weight @ x[t], -1)
            chosen = (p + experts.lora_balance_bias).topk(experts.top_k).indices.tolist()
            y = sum(
                p[i] / p[chosen].sum() * experts.lora_B[:, i] * (experts.lora_A[i] @ x[t])
                for i in chosen
            )
            rows.append(experts.lora_alpha / experts.r * y)
    return out + torch.stack(rows)


@pytest.mark.parametrize(
    "structure, gating", [("core", None), ("rankwise", "sigmoid"), ("rankwise", "softmax")]
)
def test_layer_routing_matches_formula(structure, gating):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    r = 6
    layer = MolaLinear(
        base, r if structure == "rankwise" else 4, r, 12.0, 0.0, 2,
        experts_structure=structure,
        structure_options=StructureOptions(
            top_k=2, balance_bias_rate=0.1, smora_gating=gating or "sigmoid"
        ),
    ).eval()  # fmt: skip
    with torch.no_grad():
        layer.experts.lora_B.normal_(std=0.5)
        layer.router.weight.mul_(3.0)
        if structure == "rankwise":
            layer.experts.lora_balance_bias.copy_(torch.tensor([0, 0.3, 0, 0, 0.2, 0]))
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    fast, ref = layer(x), oracle_layer(layer, x)
    tol = dict(rtol=1e-5, atol=1e-6)  # the router's softmax runs in fp32
    torch.testing.assert_close(fast, ref, **tol)
    params = [x, layer.router.weight, *(p for p in layer.experts.parameters())]
    up = torch.randn_like(fast)
    for a, b in zip(
        torch.autograd.grad(fast, params, up), torch.autograd.grad(ref, params, up), strict=True
    ):
        torch.testing.assert_close(a, b, **tol)


def test_mixlora_layout_plain_lora_on_attention():
    base, targets, _ = build("llama")
    patterns = {r"self_attn\.\w+": {"num_experts": 1}}
    cfg = MolaConfig(target_modules=targets, num_experts=4, top_k=2, module_patterns=patterns)
    model = get_mola_model(base, cfg)
    for name, layer in model.mola_layers():
        attention = ".self_attn." in name
        assert layer.num_experts == (1 if attention else 4)
        assert (layer.router is None) == attention
    assert not any(".self_attn." in n and "router" in n for n, _ in model.named_parameters())
    ids = torch.randint(0, 97, (2, 8))
    out = model(input_ids=ids, labels=ids)
    # the balance loss sees the MLP's three modules per layer only: 1 for a uniform router
    assert 0.9 < out.aux_loss / 4 < 1.5
    out.loss.backward()


def test_patterns_give_each_module_its_rank_and_experts():
    base, targets, _ = build("llama")
    patterns = {"down_proj": {"r": [2, 4], "num_experts": [2, 6]}, "q_proj": {"lora_alpha": 2}}
    model = get_mola_model(base, MolaConfig(target_modules=targets, num_experts=3, r=8,
                                            module_patterns=patterns))  # fmt: skip
    layers = dict(model.mola_layers())
    down0, down3 = layers["model.layers.0.mlp.down_proj"], layers["model.layers.3.mlp.down_proj"]
    assert (down0.num_experts, down0.r, down3.num_experts, down3.r) == (2, 2, 6, 4)
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 2 / 8
    ids = torch.randint(0, 97, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # differently sized routers in one layer


def test_single_expert_equals_peft_lora():
    base, targets, _ = build("llama")
    peft_base, _, _ = build("llama")
    torch.manual_seed(3)
    peft = get_peft_model(
        peft_base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ).eval()
    model = get_mola_model(
        base, MolaConfig(target_modules=targets, num_experts=1, top_k=1, r=4, lora_alpha=8)
    ).eval()
    assert not any("router" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        for name, layer in model.mola_layers():
            lora = peft.base_model.model.get_submodule(name)
            layer.experts.lora_A[0].copy_(lora.lora_A["default"].weight)
            layer.experts.lora_B[0].copy_(lora.lora_B["default"].weight)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft(input_ids=ids).logits)
    assert model(input_ids=ids, labels=ids).aux_loss == 0


def test_parameter_counts_per_structure():
    counts = {}
    for structure, cls in STRUCTURES.items():
        e = 8 if cls.rank_experts else 4
        layer = MolaLinear(nn.Linear(64, 48), e, 8, 16.0, top_k=2, experts_structure=structure)
        counts[structure] = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    print(counts)
    router = 4 * 64
    assert counts["stacked"] == 4 * 8 * (64 + 48) + router
    assert counts["shared_a"] == 8 * 64 + 4 * 8 * 48 + router
    assert counts["rankwise"] == 8 * (64 + 48) + 8 * 64
    assert counts["flylora"] == 8 * 48
    assert counts["core"] == 8 * (64 + 48) + 4 * 8 * 8 + 4 * 8
