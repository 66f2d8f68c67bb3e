"""Expert pruning: removals known by construction, exact outputs where the math says so, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from models import build

from mola import MolaConfig, MolaModel, get_mola_model
from mola.cli import main
from mola.inference import layer_summary, measure_loads, plan_module, prune_model
from mola.inference.prune import pruned_patterns

NEVER = "model.layers.1.mlp.down_proj"  # its expert 4 is never in any token's top 2
TWINS = "model.layers.2.self_attn.q_proj"  # its experts 1 and 3 have the same update


def random_b(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def constructed(num_experts=5, top_k=2, traps=True):
    """A tiny Llama with ``num_experts`` experts everywhere, random B, and (5 experts) two traps."""
    base, _, _ = build("llama")
    config = MolaConfig(num_experts=num_experts, top_k=top_k, r=4, lora_dropout=0.0)
    model = get_mola_model(base, config).eval()
    random_b(model)
    if not traps:
        return model
    layers = dict(model.mola_layers())
    with torch.no_grad():
        never = layers[NEVER]
        w, v = torch.randn(2, never.in_features)
        # logits w.x, -w.x, v.x, -v.x, 0: two of the first four are always positive
        never.router.weight.copy_(torch.stack([w, -w, v, -v, torch.zeros_like(w)]))
        twins = layers[TWINS]
        twins.lora_A[3] = twins.lora_A[1]
        twins.lora_B[3] = twins.lora_B[1]
    return model


def batches(seed=1, count=2):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 97, (4, 24), generator=g)} for _ in range(count)]


def test_plan_module_drops_low_load_and_groups_near_identical():
    load = torch.tensor([0.30, 0.005, 0.25, 0.20, 0.245])
    norms = torch.ones(5)
    dist = torch.full((5, 5), 2.0).fill_diagonal_(0.0)
    dist[2, 4] = dist[4, 2] = 0.01  # 2 and 4 nearly equal
    dist[0, 1] = dist[1, 0] = 0.0  # 1 equals 0 but is dropped first (load)
    kept, dropped, groups = plan_module(load, dist, norms, min_load=0.01, merge_threshold=0.05)
    assert dropped == [1]
    assert groups == [[2, 4]]  # the most used of the two is kept
    assert kept == [0, 2, 3]
    # nothing above the threshold, never merge, and the most used expert always stays
    assert plan_module(load, dist, norms, 0.01, -1.0)[2] == []
    assert plan_module(load, dist, norms, 0.99, 0.05)[0] == [0]


def test_known_removals_by_construction():
    model = constructed()
    loads = measure_loads(model, batches())
    assert float(loads[NEVER][4]) == 0.0
    report = {e["module"]: e for e in prune_model(model, loads, 1e-9, 0.01)}
    assert report[NEVER]["dropped"] == [4] and report[NEVER]["merged"] == []
    assert report[TWINS]["dropped"] == [] and len(report[TWINS]["merged"]) == 1
    assert sorted(report[TWINS]["merged"][0]) == [1, 3]
    for name, entry in report.items():
        if name not in (NEVER, TWINS):
            assert entry["dropped"] == [] and entry["merged"] == [], name
            assert entry["experts_after"] == 5
    layers = dict(model.mola_layers())
    assert layers[NEVER].num_experts == 4 and layers[NEVER].lora_A.shape[0] == 4
    assert layers[NEVER].router.weight.shape[0] == 4 and layers[NEVER].routing.num_experts == 4
    assert layers[TWINS].num_experts == 4
    summary = {row["layer"]: row for row in layer_summary(list(report.values()))}
    assert summary[1]["dropped"] == 1 and summary[2]["merged"] == 1
    assert summary[1]["before"] == 35 and summary[1]["after"] == 34


def test_dropping_unused_experts_keeps_topk_outputs_exactly():
    model = constructed()
    ids = batches(seed=3)[0]["input_ids"]
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    report = prune_model(model, measure_loads(model, batches()), 1e-9, -1.0)
    assert sum(len(e["dropped"]) for e in report) == 1
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_pruning_a_used_expert_changes_outputs_and_lowers_top_k():
    model = constructed(num_experts=2, top_k=2, traps=False)
    ids = batches(seed=3)[0]["input_ids"]
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    report = prune_model(model, measure_loads(model, batches()), 0.6, -1.0)
    assert all(e["experts_after"] == 1 and e["top_k_after"] == 1 for e in report)
    with torch.inference_mode():
        assert (model(input_ids=ids).logits - before).abs().max() > 1e-3


def test_bad_min_load():
    with pytest.raises(ValueError, match="min-load"):
        prune_model(constructed(), {}, 1.0)


def test_pruned_adapter_round_trips(tmp_path):
    model = constructed()
    ids = batches(seed=3)[0]["input_ids"]
    report = prune_model(model, measure_loads(model, batches()), 1e-9, 0.01)
    patterns = pruned_patterns(model, report)
    assert len(patterns) == 2
    config = model.mola_config.to_dict()
    config["module_patterns"] = {**patterns, **config["module_patterns"]}
    model.mola_config = MolaConfig.from_dict(config)
    model.save_pretrained(tmp_path)
    again = MolaModel.from_pretrained(build("llama")[0], tmp_path).eval()
    assert dict(again.mola_layers())[NEVER].num_experts == 4
    with torch.inference_mode():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


ROWS = [
    {"question": "What color is the sky?", "choices": ["blue", "green"], "answer": "A"},
    {"question": "Which is heavier?", "choices": ["feather", "brick"], "answer": "brick"},
    {"question": "How would Alex feel?", "choices": ["happy", "sad"], "answer": "B"},
    {"question": "Is this sarcastic? area man wins", "choices": ["no", "yes"], "answer": "yes"},
]


def test_prune_cli_end_to_end(tmp_path, tiny_llama_dir, capsys):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_mola_model(base, MolaConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
    random_b(model)
    with torch.no_grad():  # layer 0's q_proj: experts 2 and 3 learned the same update
        layer = dict(model.mola_layers())["model.layers.0.self_attn.q_proj"]
        layer.lora_A[3] = layer.lora_A[2]
        layer.lora_B[3] = layer.lora_B[2]
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "pruned"
    args = [
        "prune",
        "--adapter",
        str(adapter),
        "--output",
        str(out),
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--min-load",
        "0",
        "--merge-threshold",
        "0.01",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "experts: " in printed and "accuracy" in printed
    report = json.loads((out / "prune_report.json").read_text())
    entry = next(e for e in report["modules"] if e["module"].endswith("0.self_attn.q_proj"))
    assert entry["experts_after"] == 3 and sorted(entry["merged"][0]) == [2, 3]
    assert set(report["metrics"]) == {"before", "after"}
    again = MolaModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), out
    )
    assert dict(again.mola_layers())["model.layers.0.self_attn.q_proj"].num_experts == 3
    assert main([*args[:4], str(adapter), *args[5:]]) == 2  # output == adapter
    assert "must differ" in capsys.readouterr().err
