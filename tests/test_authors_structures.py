"""SMoRA and CoMoL as their authors' code runs them (StyxXuan/smora, DCDmllm/CoMoL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from models import build
from torch import nn

from mola import MolaConfig, MolaLinear, get_mola_model
from mola.experts import StructureOptions
from mola.methods import apply_method
from mola.training.options import TrainOptions


def comol_layer(p: float, router: str = "soft") -> MolaLinear:
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = MolaLinear(
        base, 4, 5, 5.0, p, None if router == "soft" else 2, router,
        experts_structure="core", structure_options=StructureOptions(top_k=None),
    )  # fmt: skip
    with torch.no_grad():
        layer.experts.lora_B.normal_(std=0.5)
    return layer


def comol_oracle(layer: MolaLinear, x: torch.Tensor, p: float) -> torch.Tensor:
    """LinearMoCoreLoraLayer.forward (core_router=True), token by token, written as theirs:
    ``lora_B(dropout(lora_A_x @ dropout(lora_Core))) * scaling``; mola stores each core
    transposed (``C h`` here is their ``h @ C``)."""
    experts = layer.experts
    keep = torch.rand_like(x) >= p  # the layer's input dropout draws first (dropout_mask)
    xd = x * keep / (1 - p) if p > 0 else x
    h = xd @ experts.lora_A.t()  # (N, r)
    probs = torch.softmax(h @ layer.router.weight.t(), -1)
    merged = torch.stack(
        [sum(probs[n, e] * experts.lora_C[e] for e in range(4)) for n in range(x.shape[0])]
    )
    merged = F.dropout(merged, p, training=p > 0)
    z = torch.stack([merged[n] @ h[n] for n in range(x.shape[0])])
    z = F.dropout(z, p, training=p > 0)
    return layer.base_layer(x) + (z @ experts.lora_B.t()) * (5.0 / 5)


def test_comol_training_forward_is_the_authors_with_dropout_at_three_places():
    p = 0.3
    layer = comol_layer(p).train()
    x = torch.randn(6, 12)
    torch.manual_seed(7)
    fast = layer(x)
    torch.manual_seed(7)
    ref = comol_oracle(layer, x, p)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    params = [layer.router.weight, *layer.experts.parameters()]
    up = torch.randn_like(fast)
    for a, b in zip(
        torch.autograd.grad(fast, params, up), torch.autograd.grad(ref, params, up), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_comol_eval_merges_every_core_by_softmax():
    layer = comol_layer(0.1).eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), comol_oracle(layer, x, 0.0), rtol=1e-5, atol=1e-6)


def test_comol_preset_is_the_authors_configuration():
    config = TrainOptions(**apply_method({"method": "comol"})).mola_config()
    assert (config.router, config.top_k, config.r, config.lora_alpha) == ("soft", None, "16", 16.0)
    assert config.lora_dropout == 0.1
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    base, _, _ = build("llama")
    model = get_mola_model(base, config).train()
    ids = torch.randint(3, 97, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()


def test_smora_default_is_the_authors_sigmoid_gating():
    """SRMoLELinear.forward: sigmoid scores + bias, top-k, k * normalised biased scores,
    alpha / activate_r; the bias steps by 1e-5 per training forward."""
    config = TrainOptions(**apply_method({"method": "smora"})).mola_config()
    assert (config.r, config.top_k, config.lora_alpha) == ("64", "8", 16.0)
    assert config.balance_bias_rate == 1e-5 and config.smora_gating == "sigmoid"
    torch.manual_seed(0)
    layer = MolaLinear(
        nn.Linear(9, 7), 8, 8, 16.0, 0.0, 3, experts_structure="rankwise",
        structure_options=StructureOptions(top_k=3),
    ).train()  # fmt: skip
    experts = layer.experts
    assert experts.scaling == 16.0 / 3 and experts.bias_rate == 1e-5
    with torch.no_grad():
        experts.lora_B.normal_()
        experts.lora_balance_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    x = torch.randn(4, 9)
    bias = experts.lora_balance_bias.clone()
    y = layer(x)
    scores = torch.sigmoid(x @ layer.router.weight.t()) + bias
    top, idx = scores.topk(3, -1)
    gates = torch.zeros_like(scores).scatter(-1, idx, top)
    gates = gates / gates.sum(-1, keepdim=True) * 3
    want = layer.base_layer(x) + ((x @ experts.lora_A.t()) * gates) @ experts.lora_B.t() * 16 / 3
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    counts = torch.bincount(idx.view(-1), minlength=8).float()
    step = 1e-5 * (counts.mean() - counts).sign()
    torch.testing.assert_close(experts.balance_bias(), bias + step)


def test_smora_softmax_variant_is_an_option():
    config = MolaConfig(experts_structure="rankwise", r=8, top_k=2, smora_gating="softmax")
    base, _, _ = build("llama")
    model = get_mola_model(base, config)
    layer = next(layer for _, layer in model.mola_layers())
    assert layer.experts.gating == "softmax" and layer.experts.scaling == 16.0 / 8


def test_experts_of_different_ranks_in_one_module_equal_a_loop_over_experts():
    """GuiLoMo's granularity: expert e uses its first r_e rank components, scale alpha / r."""
    torch.manual_seed(0)
    ranks = (1, 3, 2, 3)
    layer = MolaLinear(
        nn.Linear(12, 10), 4, 3, 6.0, 0.0, 2,
        structure_options=StructureOptions(top_k=2, expert_ranks=ranks),
    )  # fmt: skip
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.mul_(3.0)
    assert layer.lora_A[0, 1:].abs().sum() == 0  # beyond expert 0's rank: zero from the start
    x = torch.randn(6, 12)
    fast = layer.train()(x)
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    rows = []
    for t in range(6):
        top = probs[t].topk(2)
        out = layer.base_layer(x[t])
        for w, e in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
            a, b = layer.lora_A[e, : ranks[e]], layer.lora_B[e, :, : ranks[e]]
            out = out + w * (6.0 / 3) * (b @ (a @ x[t]))
        rows.append(out)
    ref = torch.stack(rows)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    params = [layer.router.weight, layer.lora_A, layer.lora_B]
    up = torch.randn_like(fast)
    g_fast = torch.autograd.grad(fast, params, up)
    g_ref = torch.autograd.grad(ref, params, up)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert g_fast[1][0, 1:].abs().sum() == 0 and g_fast[2][0, :, 1:].abs().sum() == 0
    with torch.no_grad():  # the inference fast path agrees
        torch.testing.assert_close(layer.eval()(x), ref, rtol=1e-5, atol=1e-6)
