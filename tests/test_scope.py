"""Block-level routing (router_scope: block) against the MixLoRA formula; the router interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import build
from safetensors.torch import load_file

from mola import MolaConfig, MolaModel, get_mola_model
from mola.core.layer import MolaLinear
from mola.routing import ROUTERS, Router, Routing, build_router


def randomise(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if "router" in name:
                p.mul_(3.0)


def lora(layer: MolaLinear, x, gates):
    """``W x + scaling * sum_e g_e B_e A_e x``, one expert at a time."""
    out = layer.base_layer(x)
    for e in range(layer.num_experts):
        update = x @ layer.lora_A[e].T @ layer.lora_B[e].T
        out = out + layer.scaling * gates[..., e, None] * update
    return out


@pytest.mark.parametrize("E,k", [(1, 1), (3, 2), (4, 1)])
def test_block_router_gates_every_mlp_module_from_the_mlp_input(E, k):
    base, targets, _ = build("llama")
    cfg = MolaConfig(num_experts=E, top_k=k, lora_dropout=0.0, router_scope="block")
    model = get_mola_model(base, cfg)
    randomise(model)
    mlp = model.base_model.model.layers[1].mlp
    attn = model.base_model.model.layers[1].self_attn
    # one router per sub-block, on the sub-block, no router on the modules
    assert mlp.router.weight.shape == (E, 32) and attn.router.weight.shape == (E, 32)
    assert mlp.down_proj.router is None and mlp.down_proj.routing is mlp.router
    x = torch.randn(2, 5, 32, requires_grad=True)
    got = mlp(x)
    probs = torch.softmax(x @ mlp.router.weight.T, -1)
    top = probs.topk(k, -1)
    gates = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    gates = gates / gates.sum(-1, keepdim=True)
    hidden = F.silu(lora(mlp.gate_proj, x, gates)) * lora(mlp.up_proj, x, gates)
    expected = lora(mlp.down_proj, hidden, gates)  # down_proj uses the gates of the MLP input
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    params = [x, mlp.router.weight, mlp.down_proj.lora_A, mlp.gate_proj.lora_B]
    upstream = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad(got, params, upstream),
        torch.autograd.grad(expected, params, upstream),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert mlp.down_proj.shared.routing is None, "the shared routing must not outlive the call"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_scope_trains_and_round_trips(family, tmp_path):
    base, targets, per_layer = build(family)
    cfg = MolaConfig(
        target_modules=targets, num_experts=[2, 3], top_k=1, router_scope="block", lora_dropout=0.1
    )
    model = get_mola_model(base, cfg)
    randomise(model)
    routers = [n for n, p in model.named_parameters() if p.requires_grad and "router" in n]
    assert len(routers) == 4 * 2  # attention + MLP sub-block of each decoder layer
    ids = torch.randint(3, 97, (2, 7))
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss > 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len([k for k in saved if k.endswith("router.weight")]) == 8
    loaded = MolaModel.from_pretrained(build(family)[0], tmp_path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_block_scope_needs_the_same_expert_count_and_a_free_name():
    base, _, _ = build("llama")
    base.model.layers[0].mlp.router = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="router_scope: .*mlp already has a 'router'"):
        get_mola_model(base, MolaConfig(num_experts=2, router_scope="block"))
    with pytest.raises(ValueError, match="router_scope: unknown scope 'x'"):
        MolaConfig(router_scope="x")


def test_registry_and_interface():
    assert list(ROUTERS)[:4] == ["topk", "switch", "topp", "soft"]
    for cls in ROUTERS.values():
        assert cls.description and cls.paper and cls.loss_names
    template = build_router("topk", 4, top_k=2)
    assert template.weight is None and list(template.parameters()) == []
    owned = build_router("topk", 4, top_k=2, in_features=6)
    assert [n for n, _ in owned.named_parameters()] == ["weight"]
    z = torch.randn(5, 4)
    routing = owned.gate(z, torch.randn(5, 6))
    assert isinstance(routing, Routing) and routing.active.tolist() == [2] * 5
    torch.testing.assert_close(routing.gates, template.route(z)[0])
    assert isinstance(owned, Router) and torch.equal(owned(torch.eye(6)), owned.weight.T)
    with pytest.raises(ValueError, match="router: 'topk' takes no option"):
        type(owned)(4, 2, None, 6, nope=1)


def test_store_keeps_each_module_routing():
    base, _, per_layer = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=[2, 4], top_k=1))
    ids = torch.randint(3, 97, (2, 6))
    with model.capture_router_logits() as store:
        model(input_ids=ids)
    records = store.layer_records(3)
    assert len(records) == per_layer and all(r.gates.shape == (12, 4) for r in records)
    assert [t for t in store.layer_logits(3)] == [r.logits for r in records]
    assert model.loss_names == ["aux_loss", "router_z_loss"]
