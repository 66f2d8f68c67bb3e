"""``mola compose``: PEFT LoRA adapters (different ranks, scales and targets) become the experts
of a mola adapter; forcing the router onto one expert reproduces that PEFT adapter exactly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mola import MolaModel
from mola.cli import main
from mola.routing import Router

PEFT_CONFIGS = [
    # rank 4 on attention, rank 2 on v_proj by pattern, alpha 8 (scale 2, and 4 on v_proj)
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
    # rank 8 on q and the MLP's down_proj, rsLoRA scale, an alpha pattern
    dict(
        r=8,
        lora_alpha=4,
        target_modules=["q_proj", "down_proj"],
        use_rslora=True,
        alpha_pattern={"down_proj": 16},
    ),  # fmt: skip
]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def peft_dirs(tiny_llama_dir, tmp_path_factory):
    dirs = []
    for i, kwargs in enumerate(PEFT_CONFIGS):
        torch.manual_seed(10 + i)
        peft = get_peft_model(load(tiny_llama_dir), LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():  # a clearly visible update
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.2)
        path = tmp_path_factory.mktemp(f"peft{i}")
        peft.save_pretrained(path)
        dirs.append(path)
    return dirs


class Forced(Router):
    """Every token to one expert, gate 1 (the test's stand-in for a trained router)."""

    name = "forced"

    def __init__(self, num_experts: int, expert: int):
        super().__init__(num_experts)
        self.expert = expert

    def route(self, logits):
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[:, self.expert] = True
        return mask.float(), mask


def test_forced_expert_reproduces_each_peft_adapter(tiny_llama_dir, peft_dirs, tmp_path, capsys):
    out = tmp_path / "composed"
    argv = ["compose", "--adapters", *map(str, peft_dirs), "--output", str(out)]
    assert main([*argv, "--model", str(tiny_llama_dir), "--no-progress"]) == 0
    assert "composed 2 LoRA adapters" in capsys.readouterr().out
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert (saved["num_experts"], saved["r"], saved["router"]) == (2, 8, "soft")
    model = MolaModel.from_pretrained(load(tiny_llama_dir), str(out)).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        base = model.base_model(input_ids=ids).logits
        for i, path in enumerate(peft_dirs):
            for _, layer in model.mola_layers():
                layer.routing = Forced(2, i)
            mine = model(input_ids=ids).logits
            want = PeftModel.from_pretrained(load(tiny_llama_dir), str(path))(input_ids=ids).logits
            assert (want - base).abs().max() > 1e-2  # the adapter does change the output
            torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)


def test_train_init_from_composed_trains_only_routers(tiny_llama_dir, peft_dirs, tmp_path):
    composed, out = tmp_path / "composed", tmp_path / "run"
    argv = ["compose", "--adapters", *map(str, peft_dirs), "--output", str(composed)]
    assert main([*argv, "--model", str(tiny_llama_dir), "--no-progress"]) == 0
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": "Name a fruit.", "output": "apple banana cherry"}] * 8
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--no-eval"]
    opts = ["--init-from", str(composed), "--max-steps", "3", "--lr", "0.05", "--no-progress"]
    assert main([*train, *opts, "--batch-size", "4", "--output", str(out)]) == 0
    before, after = (load_file(d / "adapter_model.safetensors") for d in (composed, out))
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith("router.weight") for k in moved)
    assert json.loads((out / "adapter_config.json").read_text())["num_experts"] == 2


def test_compose_refuses_dora(tiny_llama_dir, tmp_path, capsys):
    peft = get_peft_model(load(tiny_llama_dir), LoraConfig(r=2, use_dora=True))
    peft.save_pretrained(tmp_path / "dora")
    capsys.readouterr()
    argv = ["compose", "--adapters", str(tmp_path / "dora"), "--output", str(tmp_path / "o")]
    assert main([*argv, "--model", str(tiny_llama_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mola: error: --adapters: ")
    assert "uses DoRA; only plain LoRA composes" in err[0]


def test_compose_missing_directory(tmp_path, capsys):
    assert main(["compose", "--adapters", str(tmp_path / "nope"), "--output", "x"]) == 2
    assert "adapter_config.json not found" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mola: error: "), err
    return err[0]


def _compose(tiny_llama_dir, adapters, out) -> int:
    argv = ["compose", "--adapters", *map(str, adapters), "--output", str(out)]
    return main([*argv, "--model", str(tiny_llama_dir), "--no-progress"])


def test_compose_refuses_an_activated_lora(tiny_llama_dir, tmp_path, capsys):
    cfg = LoraConfig(r=2, target_modules=["q_proj"], alora_invocation_tokens=[5, 6])
    get_peft_model(load(tiny_llama_dir), cfg).save_pretrained(tmp_path / "alora")
    capsys.readouterr()
    assert _compose(tiny_llama_dir, [tmp_path / "alora"], tmp_path / "o") == 2
    assert "activated LoRA (aLoRA" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_compose_refuses_a_lora_on_lm_head(tiny_llama_dir, tmp_path, capsys):
    cfg = LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    get_peft_model(load(tiny_llama_dir), cfg).save_pretrained(tmp_path / "head")
    capsys.readouterr()
    assert _compose(tiny_llama_dir, [tmp_path / "head"], tmp_path / "o") == 2
    assert "has a LoRA on lm_head, outside the decoder layers" in _one_line_error(capsys)


def test_compose_names_peft_sub_adapters(tiny_llama_dir, tmp_path, capsys):
    peft = get_peft_model(load(tiny_llama_dir), LoraConfig(r=2), adapter_name="second")
    peft.save_pretrained(tmp_path / "named")
    assert (tmp_path / "named" / "second" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert _compose(tiny_llama_dir, [tmp_path / "named"], tmp_path / "o") == 2
    line = _one_line_error(capsys)
    assert "named adapters second in sub-directories" in line
    assert str(tmp_path / "named" / "second") in line


def test_compose_reads_a_bin_adapter_like_safetensors(tiny_llama_dir, peft_dirs, tmp_path):
    peft = PeftModel.from_pretrained(load(tiny_llama_dir), str(peft_dirs[0]))
    peft.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    assert _compose(tiny_llama_dir, [tmp_path / "bin"], tmp_path / "from_bin") == 0
    assert _compose(tiny_llama_dir, [peft_dirs[0]], tmp_path / "from_st") == 0
    a = load_file(tmp_path / "from_bin" / "adapter_model.safetensors")
    b = load_file(tmp_path / "from_st" / "adapter_model.safetensors")
    experts = [k for k in a if "router" not in k]
    assert experts and all(torch.equal(a[k], b[k]) for k in experts)


def test_allocate_negative_budget_is_one_line_before_any_work(tmp_path, capsys):
    argv = ["allocate", "--budget", "-3", "--model", str(tmp_path / "no-model")]
    assert main([*argv, "--output", str(tmp_path / "a.yaml")]) == 2
    assert "--budget: must be a positive count, got -3" in _one_line_error(capsys)
