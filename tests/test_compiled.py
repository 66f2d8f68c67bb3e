"""``torch.compile`` of a mola model (mola.inference.compiled): equal outputs, no graph breaks.

The model-level tests trace with ``backend="aot_eager"`` (dynamo and AOT autograd, what mola's
code meets; no C++ code generation, so they take seconds on a CPU) and ``fullgraph=True`` (a
graph break fails the test); one test runs the default inductor backend on a single layer.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn

from mola import MolaConfig, MolaLinear, get_mola_model
from mola.cli import main
from mola.inference.compiled import compile_model, compile_regions

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_mola(seed=0, **config):
    model = build_tiny_llama(97, seed=seed)
    model.generation_config.pad_token_id = 0
    config = {"num_experts": [2, 4], "top_k": 2, "target_modules": TARGETS, **config}
    mola = get_mola_model(model, MolaConfig(lora_dropout=0.0, **config)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mola.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return mola


def test_regions_are_the_mlps_and_the_attention_projections():
    model = tiny_mola()
    names = {id(m): n for n, m in model.named_modules()}
    regions = [names[id(m)] for m in compile_regions(model)]
    layer = "base_model.model.layers.{}."
    expected = []
    for i in range(2):
        attn = [f"{layer.format(i)}self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        expected += [*attn, f"{layer.format(i)}mlp"]
    assert regions == expected


def test_compiled_forward_and_generate_equal_eager():
    torch._dynamo.reset()
    model = tiny_mola()
    ids = torch.randint(1, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    kwargs = {"max_new_tokens": 4, "do_sample": False, "top_k": None, "top_p": None}
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
        short = model(input_ids=ids[:1, :5]).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert compile_model(model, backend="aot_eager", fullgraph=True) == 10
    with torch.inference_mode():
        compiled_logits = model(input_ids=ids, attention_mask=mask).logits
        compiled_short = model(input_ids=ids[:1, :5]).logits  # another batch and length
        compiled_tokens = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_short, short, rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled_tokens, tokens)


@pytest.mark.parametrize("tokens", [1, 5])
def test_inductor_compiled_layer_equals_eager(tokens):
    """The default backend (C++ code generation) on one default-config layer."""
    torch.manual_seed(0)
    layer = MolaLinear(nn.Linear(16, 12), 4, r=4, top_k=2).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(tokens, 16)
    with torch.inference_mode():
        eager = layer(x)
        compiled = torch.compile(layer, dynamic=True, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_generate_cli_compiled_prints_the_eager_text(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_mola_model(base, MolaConfig(num_experts=2, top_k=1, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    argv = ["generate", "--adapter", str(tmp_path / "adapter"), "Name a fruit.", "--no-progress"]
    argv += ["--max-new-tokens", "4", "--template", "raw"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert main([*argv, "--compile", "aot_eager"]) == 0
    out = capsys.readouterr()
    assert out.out == eager and "compiling 10 regions with aot_eager" in out.err
    assert main([*argv, "--compile", "nonsense"]) == 2
    assert "mola: error: --compile: unknown backend 'nonsense'" in capsys.readouterr().err
    base_only = ["generate", "--model", str(tiny_llama_dir), "Hi", "--compile", "--no-progress"]
    assert main(base_only) == 2
    assert "no adapted modules to compile" in capsys.readouterr().err
