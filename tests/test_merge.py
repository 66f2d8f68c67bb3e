"""Exact merging: folded models equal the adapter; what cannot fold is named; the CLI output
loads without mola."""

from __future__ import annotations

import json

import pytest
import torch
from models import build

from mola import MolaConfig, MolaModel, get_mola_model
from mola.cli import main
from mola.core.layer import MolaLinear
from mola.inference import fold_modules, merge_plan


def adapted(family="llama", seed=0, **config):
    base, targets, _ = build(family)
    config = MolaConfig(target_modules=targets, r=4, lora_dropout=0.0, **config)
    model = get_mola_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "router" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def logits(model, seed=5):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and GPT-2's Conv1D
@pytest.mark.parametrize("router", ["topk", "soft", "switch"])
def test_one_expert_modules_fold_exactly(family, router):
    top_k = 1 if router == "topk" else None
    model = adapted(family, num_experts=1, top_k=top_k, router=router)
    expected = logits(model)
    plan = merge_plan(model)
    assert plan and all(d.mergeable for d in plan)
    assert fold_modules(model, {d.module for d in plan}) == len(plan)
    assert not any(isinstance(m, MolaLinear) for m in model.modules())
    torch.testing.assert_close(logits(model.base_model), expected, rtol=1e-5, atol=1e-5)


def test_mixed_model_says_what_cannot_merge():
    model = adapted(num_experts=[1, 2, 1, 2], top_k=1)
    layers = dict(model.mola_layers())
    equal = "model.layers.3.self_attn.v_proj"
    with torch.no_grad():  # two equal experts under renormalised top-1: routing does not matter
        layers[equal].lora_A[1] = layers[equal].lora_A[0]
        layers[equal].lora_B[1] = layers[equal].lora_B[0]
    plan = {d.module: d for d in merge_plan(model)}
    for name, d in plan.items():
        expected = d.layer in (0, 2) or name == equal
        assert d.mergeable == expected, (name, d.reason)
        if not expected:
            assert "different experts" in d.reason
    assert "equal" in plan[equal].reason
    expected = logits(model)
    mergeable = {n for n, d in plan.items() if d.mergeable}
    fold_modules(model, mergeable)
    assert len(list(model.mola_layers())) == len(plan) - len(mergeable)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged"):
        fold_modules(model, {"model.layers.1.self_attn.q_proj"})


def test_equal_experts_under_switch_are_not_mergeable():
    model = adapted(num_experts=2, router="switch")
    with torch.no_grad():
        for _, layer in model.mola_layers():
            layer.lora_A[1] = layer.lora_A[0]
            layer.lora_B[1] = layer.lora_B[0]
    assert all("do not sum to 1" in d.reason for d in merge_plan(model))


def test_merge_cli_plain_model_and_partial(tmp_path, tiny_llama_dir, capsys):
    from transformers import AutoModelForCausalLM

    from mola.models.loading import load_adapted

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)

    def save(path, num_experts):
        model = get_mola_model(fresh(), MolaConfig(num_experts=num_experts, top_k=1, r=4))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.save_pretrained(path)
        return logits(model.eval())

    plain = tmp_path / "plain"
    expected = save(plain, 1)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(plain), "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["folded"] == 14 and report["kept_as_adapter"] == []
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    assert not (out / "adapter").exists()

    mixed = tmp_path / "mixed"
    expected = save(mixed, [1, 2])
    capsys.readouterr()
    blocked = tmp_path / "blocked"
    assert main(["merge", "--adapter", str(mixed), "--output", str(blocked), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "7 of 14 modules cannot be merged" in err[0]
    assert not blocked.exists()
    part = tmp_path / "partial"
    code = main(
        ["merge", "--adapter", str(mixed), "--output", str(part), "--partial", "--no-progress"]
    )
    assert code == 0
    report = json.loads((part / "merge_report.json").read_text())
    assert report["folded"] == 7 and len(report["kept_as_adapter"]) == 7
    assert report["max_abs_logit_diff"] < 1e-4
    model, _ = load_adapted(str(part / "adapter"), progress=False)
    assert isinstance(model, MolaModel) and len(list(model.mola_layers())) == 7
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
