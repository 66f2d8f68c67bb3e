"""``mola eval --harness``: lm-evaluation-harness on a mola adapter, offline, with a local task.

The same multiple-choice items, with the same prompt, are scored by mola's own log-likelihood
scorer and by the harness (its HF model class wrapping mola's model object): they must agree
item by item.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip(
    "lm_eval", reason="needs lm-evaluation-harness: pip install 'mola-lora[harness]'"
)

from mola.cli import main  # noqa: E402
from mola.core.config import MolaConfig  # noqa: E402
from mola.core.model import MolaModel, get_mola_model  # noqa: E402
from mola.data.datasets import load_file  # noqa: E402
from mola.evaluation.harness import parse_tasks  # noqa: E402
from mola.evaluation.scoring import score_choices  # noqa: E402

ITEMS = [
    {"question": "What color is the sky?", "choices": ["blue", "green", "red"], "answer": "blue"},
    {"question": "Which is heavier?", "choices": ["The brick", "The feather"], "answer": "A"},
    {"question": "How would Alex feel?", "choices": ["happy", "sad", "angry tired"], "answer": "B"},
    {"question": "Name a fruit.", "choices": ["apple", "the cat sat", "dog"], "answer": "apple"},
]
# mola's "qa" template: "Question: {question}\nAnswer:" then " {choice}"
TASK_YAML = """task: mola_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{choices.index(answer) if answer in choices else 'ABCD'.index(answer)}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """A saved adapter with non-zero experts, a task directory and its JSONL data."""
    root = tmp_path_factory.mktemp("harness")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mola_local_mc.yaml").write_text(TASK_YAML.format(data=data))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = MolaConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, top_k=1)
    model = get_mola_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():  # experts start at B = 0; make the adapter change the scores
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    return {"adapter": adapter, "tasks": tasks, "data": data, "root": root}


def test_harness_and_mola_agree_item_by_item(setup, tiny_llama_dir, capsys):
    out = setup["root"] / "eval"
    args = ["eval", "--adapter", str(setup["adapter"]), "--harness", "mola_local_mc"]
    args += ["--harness-include", str(setup["tasks"]), "--output", str(out), "--batch-size", "3"]
    assert main([*args, "--no-progress"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "Running loglikelihood" not in captured.err  # --no-progress hides the harness's bars
    assert "|mola_local_mc|" in printed and "acc" in printed  # the harness's table
    results = json.loads((out / "harness_results.json").read_text())
    assert results["results"]["mola_local_mc"]["sample_len"] == len(ITEMS)
    samples = [json.loads(line) for line in (out / "harness_samples.jsonl").open()]
    samples.sort(key=lambda s: s["doc_id"])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = MolaModel.from_pretrained(base, str(setup["adapter"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ours = score_choices(model, tokenizer, load_file(setup["data"]), "qa", 4, 256, False)
    assert len(samples) == len(ours) == len(ITEMS)
    for sample, score in zip(samples, ours, strict=True):
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert theirs == pytest.approx(score["logprobs"], abs=1e-4)
        assert max(range(len(theirs)), key=theirs.__getitem__) == score["pred"]
        assert int(sample["target"]) == score["label"]
    accuracy = sum(s["pred"] == s["label"] for s in ours) / len(ours)
    assert results["results"]["mola_local_mc"]["acc,none"] == pytest.approx(accuracy)
    # the adapter changed the scores: the harness scored mola's model, not the bare base
    bare_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    bare = score_choices(bare_model, tokenizer, load_file(setup["data"]), "qa", 4, 256, False)
    assert any(
        abs(a - b) > 1e-3
        for s, b_s in zip(ours, bare, strict=True)
        for a, b in zip(s["logprobs"], b_s["logprobs"], strict=True)
    )


def test_unknown_task_and_bad_flags_are_one_line(setup, tmp_path, capsys):
    args = ["eval", "--adapter", str(setup["adapter"]), "--output", str(tmp_path / "o")]
    assert main([*args, "--harness", "no_such_task_xyz", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mola: error: --harness: unknown task 'no_such_task_xyz' "
        "(add task YAMLs with --harness-include)"
    ]
    assert main([*args, "--num-fewshot", "2"]) == 2
    assert "--num-fewshot: only with --harness" in capsys.readouterr().err
    assert main([*args, "--harness", "x", "--data", str(setup["data"])]) == 2
    assert "not --data" in capsys.readouterr().err
    with pytest.raises(ValueError, match="task names separated by commas"):
        parse_tasks("a,,b")
    assert parse_tasks("a, b") == ["a", "b"]
