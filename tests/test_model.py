"""get_mola_model / MolaModel across model families: injection, equality, losses, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from models import FAMILIES, build
from safetensors.torch import load_file

from mola import MolaConfig, MolaLinear, MolaModel, get_mola_model
from mola.core.injection import find_decoder_layers

FAMILY_NAMES = list(FAMILIES)


def inputs(seed=1, batch=2, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask


def randomise_adapter(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_injection_allocation_and_identity(family):
    base, targets, per_layer = build(family)
    ids, mask = inputs()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    cfg = MolaConfig(target_modules=targets, num_experts="inverted-triangle", top_k=[1, 2, 2, 2])
    model = get_mola_model(base, cfg)
    layers = list(model.mola_layers())
    assert len(layers) == 4 * per_layer
    for name, layer in layers:
        assert layer.num_experts == [2, 4, 6, 8][layer.layer_idx]
        assert f".{layer.layer_idx}." in name
        assert layer.routing.top_k == [1, 2, 2, 2][layer.layer_idx]
    assert model.allocation == {
        "num_experts": [2, 4, 6, 8],
        "top_k": [1, 2, 2, 2],
        "r": [8, 8, 8, 8],
    }
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref), "a fresh MoLA model must equal its base model bit for bit"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".router." in n for n in trainable)
    assert model.config is base.config


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_loss_gradients_and_checkpoint_round_trip(family, tmp_path):
    base, targets, _ = build(family)
    cfg = MolaConfig(
        target_modules=targets,
        num_experts=[2, 3],
        top_k=2,
        r=[4, 2],
        lora_dropout=0.0,
        aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
    )
    model = get_mola_model(base, cfg)
    randomise_adapter(model)
    ids, mask = inputs()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    expected = out.lm_loss + 0.01 * out.aux_loss + 0.001 * out.router_z_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss.item() > 0 and out.router_z_loss.item() > 0
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert model.router_store.logits == {}, "router logits must not outlive the forward"

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".lora_" in k or ".router." in k for k in saved)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_class"] == type(base).__name__
    assert config["allocation"]["num_experts"] == [2, 2, 3, 3]
    assert config["allocation"]["r"] == [4, 4, 2, 2]

    fresh, _, _ = build(family)
    loaded = MolaModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert loaded.mola_config == cfg
    assert not any(p.requires_grad for p in loaded.parameters())


def test_aux_loss_equals_sum_of_per_layer_balance_losses():
    from mola import build_router, load_balancing_loss

    base, targets, per_layer = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=[2, 4], top_k=1))
    ids, mask = inputs()
    with model.capture_router_logits() as store:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(store.logits) == [0, 1, 2, 3]
    assert all(len(store.logits[i]) == per_layer for i in range(4))
    expected = sum(
        load_balancing_loss(store.layer_logits(i), build_router("topk", e, top_k=1), mask)
        for i, e in enumerate([2, 2, 4, 4])
    )
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.aux_loss, expected)


def test_generate_and_disable_adapter_and_no_leak():
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=2))
    ids, mask = inputs()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    randomise_adapter(model)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    out = model.generate(
        input_ids=ids[:1],
        attention_mask=mask[:1],
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape == (1, 13)
    assert model.router_store.logits == {}


def test_print_trainable_parameters(capsys):
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=2, r=4))
    model.print_trainable_parameters()
    text = capsys.readouterr().out
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable params: {trainable:,d}" in text and "trainable%" in text


def test_gradient_checkpointing_keeps_router_gradients():
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=2, top_k=1, aux_loss_coef=1.0))
    model.train()
    model.gradient_checkpointing_enable()
    new_api = hasattr(type(base), "is_activation_checkpointing")
    assert base.is_activation_checkpointing if new_api else base.is_gradient_checkpointing
    ids, mask = inputs()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    router = model.base_model.model.layers[0].self_attn.q_proj.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert model.router_store.logits == {}


def test_decoder_layers_found_from_structure():
    base, _, _ = build("gpt2")
    name, blocks = find_decoder_layers(base)
    assert name == "transformer.h" and len(blocks) == 4
    base, _, _ = build("llama")
    assert find_decoder_layers(base)[0] == "model.layers"


def test_regex_targets_only_mlp():
    base, _, _ = build("llama")
    model = get_mola_model(
        base, MolaConfig(target_modules=r".*\.mlp\.(up|down)_proj", num_experts=2)
    )
    names = [n.rsplit(".", 1)[-1] for n, _ in model.mola_layers()]
    assert names == ["up_proj", "down_proj"] * 4


@pytest.mark.parametrize(
    "cfg,message",
    [
        (
            MolaConfig(target_modules=["foo"], num_experts=2),
            r"target_modules: \['foo'\] matches no module in the decoder layers; linear modules "
            r"there: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        ),
        (
            MolaConfig(target_modules=["input_layernorm"], num_experts=2),
            "is a LlamaRMSNorm, not a linear layer",
        ),
        (MolaConfig(num_experts=[2, 2, 3, 4, 5]), "num_experts: got 5 values for 4 decoder"),
        (
            MolaConfig(num_experts=[3, 2], top_k=[3, 3, 3, 3]),  # (1 expert: a plain LoRA)
            "decoder layer 2: top_k: 3 is not in 1..2",
        ),
        (
            MolaConfig(target_modules=["q_proj", "nonexistent_proj"], num_experts=2),
            r"target_modules: \['nonexistent_proj'\] matches no module",
        ),
    ],
)
def test_bad_model_config(cfg, message):
    base, _, _ = build("llama")
    with pytest.raises(ValueError, match=message) as err:
        get_mola_model(base, cfg)
    assert "\n" not in str(err.value)


def test_adapter_on_wrong_base_is_rejected(tmp_path):
    base, _, _ = build("llama")
    get_mola_model(base, MolaConfig(num_experts=2)).save_pretrained(tmp_path)
    other, _, _ = build("qwen2")
    with pytest.raises(ValueError, match="trained on a LlamaForCausalLM"):
        MolaModel.from_pretrained(other, tmp_path)
    with pytest.raises(ValueError, match="not found"):
        MolaModel.from_pretrained(build("llama")[0], tmp_path / "nope")


def test_layer_type_is_mola_linear():
    base, _, _ = build("gpt2")
    model = get_mola_model(base, MolaConfig(target_modules=["c_attn"], num_experts=2))
    assert isinstance(model.base_model.transformer.h[0].attn.c_attn, MolaLinear)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_head_only_at_labelled_positions_matches_full_loss(family):
    base, targets, _ = build(family)
    model = get_mola_model(
        base, MolaConfig(target_modules=targets, num_experts=2, lora_dropout=0.0)
    )
    randomise_adapter(model)
    ids, mask = inputs(length=12)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :7] = -100  # prompt tokens carry no loss
    labels[1, :4] = -100
    full = model(input_ids=ids, attention_mask=mask, labels=labels)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.logits_only_where_labelled = True
    sparse = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert sparse.logits.shape[1] < full.logits.shape[1]
    torch.testing.assert_close(sparse.lm_loss, full.lm_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.loss, full.loss, rtol=1e-5, atol=1e-6)
    sparse.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6)
