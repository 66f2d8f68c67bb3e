"""Every expert structure trains end to end through ``mola train`` (20 steps on a tiny model),
lowers the training loss, and its saved adapter reloads to the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mola import MolaModel
from mola.cli import main

ROWS = [
    {"instruction": "Name a fruit.", "output": "apple banana cherry"},
    {"instruction": "Translate to French.", "input": "hello world", "output": "bonjour le monde"},
] * 8

STRUCTURES = {  # the presets (tiny-model sizes where a preset's spec needs 4+ layers)
    "hydralora": ["--method", "hydralora"],
    "mosld": ["--method", "mosld"],
    "smora": ["--method", "smora"],
    "flylora": ["--method", "flylora"],
    "comol": ["--method", "comol"],
    "hilo": ["--method", "hilo", "--experts", "2,4", "--r", "2,4"],
    "mixlora-layout": [
        "--experts",
        "3",
        "--module-patterns",
        '{"self_attn\\\\..*": {"num_experts": 1, "top_k": 1}}',
    ],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "inst.json"
    path.write_text(json.dumps(ROWS))
    return path


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_structure_trains_20_steps(name, tiny_llama_dir, data, tmp_path):
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--no-eval"]
    argv += ["--max-steps", "20", "--lr", "0.01", "--batch-size", "4", "--logging-steps", "5"]
    argv += ["--train-on-inputs", "--no-progress", "--save-steps", "0", "--output", str(tmp_path)]
    assert main([*argv, *STRUCTURES[name]]) == 0
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        model = MolaModel.from_pretrained(base, str(tmp_path))
        assert not torch.equal(model(input_ids=ids).logits, want)  # it learned something
