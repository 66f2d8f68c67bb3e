"""``--bf16`` / ``--fp16``: autocast compute, fp32 master weights, fp32 router losses."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from mola import MolaConfig, get_mola_model
from mola.cli import main

ROWS = [{"instruction": "Name a fruit" + " please" * (i % 3), "output": "apple"} for i in range(8)]


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_fresh_model_equals_base_under_bf16_autocast(tiny_llama):
    base, _ = tiny_llama
    base = copy.deepcopy(base)
    ids = torch.randint(
        0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad(), bf16_autocast():
        want = base(input_ids=ids).logits.float()
    model = get_mola_model(base, MolaConfig(num_experts=[2, 3], r=4, lora_dropout=0.1)).eval()
    with torch.no_grad(), bf16_autocast():
        got = model(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 tolerance


def test_bf16_step_keeps_fp32_master_weights_and_fp32_router_losses(tiny_llama):
    base, _ = tiny_llama
    cfg = MolaConfig(num_experts=[2, 3], r=4, lora_dropout=0.1, aux_loss_coef=0.01)
    torch.manual_seed(0)
    model = get_mola_model(copy.deepcopy(base), cfg).train()
    ids = torch.randint(
        0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(0)
    out32 = model(input_ids=ids, labels=ids)
    out32.loss.backward()
    grads32 = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch.manual_seed(0)  # same dropout mask
    with bf16_autocast():
        out = model(input_ids=ids, labels=ids)
    assert out.aux_loss.dtype == torch.float32 and out.lm_loss.dtype == torch.float32
    assert out.aux_loss.item() == pytest.approx(out32.aux_loss.item(), rel=2e-2)
    out.loss.backward()
    got, want = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
            if "lora_B" in name:  # B = 0: A's and the routers' gradients are ~0 or rounding
                got.append(param.grad.flatten())
                want.append(grads32[name].flatten())
    # bf16 rounding (and the odd near-tied token routed to another expert): close, not equal
    cos = torch.nn.functional.cosine_similarity(torch.cat(got), torch.cat(want), dim=0)
    assert cos > 0.99


def test_cli_bf16_trains_on_cpu_and_saves_fp32_adapter(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    code = main(
        [
            *["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(out)],
            *["--bf16", "--max-steps", "2", "--batch-size", "4", "--experts", "2,3"],
            *["--logging-steps", "1", "--save-steps", "0", "--no-eval", "--no-progress"],
        ]
    )
    assert code == 0
    assert "1 process (cpu, bf16)" in capsys.readouterr().out
    weights = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--fp16"], "--fp16: needs a CUDA GPU"), (["--bf16", "--fp16"], "choose one")],
)
def test_fp16_needs_a_gpu_and_excludes_bf16(tiny_llama_dir, tmp_path, capsys, flags, message):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = main(
        [
            *["train", "--model", str(tiny_llama_dir), "--data", str(data)],
            *["--output", str(tmp_path / "out"), "--max-steps", "1", "--experts", "2,3"],
            *["--no-eval", "--no-progress", *flags],
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
