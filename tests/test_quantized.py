"""``--load-in-4bit`` / ``--load-in-8bit``: a bitsandbytes base (QLoRA style) on the CPU.

bitsandbytes 0.50 runs 4- and 8-bit forward and backward on the CPU; these tests need it
(``pip install "mola-lora[quant]"``) and are skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mola import MolaConfig, MolaLinear, MolaModel, get_mola_model
from mola.cli import main
from mola.models.loading import load_base
from mola.models.placement import LoadOptions
from mola.models.precision import dequantized_weight, quantized_bits

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason='needs bitsandbytes: pip install "mola-lora[quant]"',
)

ROWS = [
    {"instruction": f"Name a {kind}{' please' * (i % 3)}", "output": answer}
    for i, (kind, answer) in enumerate([("fruit", "apple"), ("color", "blue")] * 4)
]
CONFIG = dict(num_experts=[2, 3], r=4, top_k=2, lora_dropout=0.0)
TOLERANCE = 1e-3
"""Largest relative L2 difference of the logits, mola on a 4-bit base vs mola on the same
weights dequantized to fp32 (both compute in fp32; only the kernels' summation order differs)."""


def _write_rows(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return data


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(std=0.05)


def test_4bit_base_equals_mola_on_the_dequantized_weights(tiny_llama_dir, tmp_path):
    options = LoadOptions(load_in_4bit=True, device="cpu", dtype="float32")
    q_base, _ = load_base(str(tiny_llama_dir), progress=False, options=options)
    assert quantized_bits(q_base) == 4
    full_base, _ = load_base(str(tiny_llama_dir), progress=False)
    with torch.no_grad():  # the fp32 model holding exactly the 4-bit weights
        for name, module in q_base.named_modules():
            if type(module).__name__ == "Linear4bit":
                full_base.get_submodule(name).weight.copy_(dequantized_weight(module))
    quant = get_mola_model(q_base, MolaConfig(**CONFIG)).eval()
    layers = dict(quant.mola_layers())
    assert layers and all(type(m.base_layer).__name__ == "Linear4bit" for m in layers.values())
    assert all(isinstance(m, MolaLinear) for m in layers.values())
    assert {p.dtype for p in quant.parameters() if p.requires_grad} == {torch.float32}
    _perturb(quant)
    quant.save_pretrained(tmp_path / "adapter")
    full = MolaModel.from_pretrained(full_base, tmp_path / "adapter").eval()
    ids = torch.randint(0, 600, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = quant(input_ids=ids).logits, full(input_ids=ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < TOLERANCE, rel
    # and the 4-bit weights are really 4-bit: far from the original fp32 ones
    orig, _ = load_base(str(tiny_llama_dir), progress=False)
    with torch.no_grad():
        far = ((orig(input_ids=ids).logits - want).norm() / want.norm()).item()
    assert far > 10 * rel


def test_8bit_base_forward_and_backward(tiny_llama_dir):
    options = LoadOptions(load_in_8bit=True, device="cpu")
    base, _ = load_base(str(tiny_llama_dir), progress=False, options=options)
    assert quantized_bits(base) == 8
    model = get_mola_model(base, MolaConfig(**CONFIG)).train()
    ids = torch.randint(0, 600, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cli_qlora_trains_saves_and_reloads_on_both_bases(tiny_llama_dir, tmp_path, capsys):
    data = _write_rows(tmp_path)
    out = tmp_path / "run"
    code = main(
        [
            *["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(out)],
            *["--load-in-4bit", "--gradient-checkpointing", "--max-steps", "20", "--lr", "5e-3"],
            *["--batch-size", "4", "--experts", "2", "--logging-steps", "5", "--save-steps", "0"],
            *["--no-eval", "--no-progress"],
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "kernels-community" not in captured.err
    assert "; base 4-bit nf4" in captured.out
    losses = [
        json.loads(line)["loss"]
        for line in (out / "train_log.jsonl").read_text().splitlines()
        if '"loss"' in line and '"train_loss"' not in line
    ]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    weights = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the usual adapter format
    results = {}
    for flags in (["--load-in-4bit"], []):  # onto a quantized and an unquantized base
        where = tmp_path / f"eval{len(flags)}"
        code = main(
            [
                *["eval", "--adapter", str(out), "--data", str(data), *flags],
                *["--no-progress", "--output", str(where)],
            ]
        )
        assert code == 0, capsys.readouterr().err
        results[len(flags)] = json.loads((where / "metrics.json").read_text())["metrics"]["loss"]
    # the adapter was trained on the 4-bit weights: close on the full base, not identical
    assert abs(results[1] - results[0]) < 0.5, results
    code = main(["merge", "--adapter", str(out), "--output", str(tmp_path / "m"), "--load-in-4bit"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "refuses to fold into quantized weights" in err[0]


def test_8bit_eval_keeps_stderr_quiet(tiny_llama_dir, tmp_path):
    data = _write_rows(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "mola.cli", "eval", "--model", str(tiny_llama_dir)]
        + ["--data", str(data), "--limit", "2", "--load-in-8bit", "--no-progress"]
        + ["--output", str(tmp_path / "ev")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def test_both_quantizations_and_a_missing_bitsandbytes_are_one_line(
    tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    data = _write_rows(tmp_path)
    args = ["eval", "--model", str(tiny_llama_dir), "--data", str(data), "--no-progress"]
    code = main([*args, "--load-in-4bit", "--load-in-8bit"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["mola: error: --load-in-4bit and --load-in-8bit: choose one"]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    code = main([*args, "--load-in-4bit"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert 'pip install "mola-lora[quant]"' in err[0] and "--load-in-4bit" in err[0]
