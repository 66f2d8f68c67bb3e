"""``mola analyze`` end to end on a tiny random Llama: JSON, summary, PNG files, compare."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mola import MolaConfig, get_mola_model
from mola.analysis.plots import DPI, plot_compare_redundancy, plot_entropy, plot_expert_load
from mola.cli import main
from mola.data.datasets import load_file as load_data_file
from mola.data.prompts import encode_for_training

ROWS = [
    {"question": "What color is the sky?", "choices": ["blue", "green"], "answer": "A"},
    {"instruction": "Name a fruit.", "output": "apple"},
    {"question": "Which is heavier?", "context": "a feather or a brick",
     "choices": ["feather", "brick"], "answer": "brick"},
    {"instruction": "Translate to French.", "input": "hello world", "output": "bonjour le monde"},
    {"instruction": "Add the numbers 1 2 3.", "output": "6"},
    {"question": "How would Alex feel?", "choices": ["happy", "sad", "tired"], "answer": "C"},
]  # fmt: skip


def make_adapter(model_dir, path, num_experts, top_k, seed):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = MolaConfig(num_experts=num_experts, top_k=top_k, r=4, lora_alpha=8.0)
    model = get_mola_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("analyze")
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    tri = make_adapter(tiny_llama_dir, root / "tri", [2, 4], 1, seed=1)
    square = make_adapter(tiny_llama_dir, root / "square", 3, 2, seed=2)
    return {"root": root, "data": data, "tri": tri, "square": square, "model": tiny_llama_dir}


def common(setup, limit="5"):
    return [
        "--model", str(setup["model"]), "--data", str(setup["data"]), "--limit", limit,
        "--batch-size", "2", "--no-progress",
    ]  # fmt: skip


def strict_json(path):
    def reject(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def pixels(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def naive_redundancy(weights, prefix, scaling):
    a, b = weights[f"{prefix}.lora_A"].double(), weights[f"{prefix}.lora_B"].double()
    full = [scaling * (b[e] @ a[e]) for e in range(a.shape[0])]
    pairs = [
        float((full[i] - full[j]).norm()) for i in range(len(full)) for j in range(i + 1, len(full))
    ]
    return sum(pairs) / len(pairs)


def test_analyze_writes_json_summary_and_plots(setup, tiny_tokenizer, capsys):
    out = setup["root"] / "out-tri"
    rc = main(["analyze", "--adapter", str(setup["tri"]), "--output", str(out), *common(setup)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(os.listdir(out)) == [
        "analysis.json",
        "entropy.png",
        "expert_load.png",
        "redundancy.png",
    ]
    report = strict_json(out / "analysis.json")
    assert report["format"] == "mola-analysis" and report["label"] == "tri"
    assert report["data"]["examples"] == 5 and report["data"]["split"] == "test"
    assert report["base_model"] == str(setup["model"])
    # every non-padding token of the 5 encoded examples was counted, nothing more
    examples = load_data_file(setup["data"])[:5]
    lengths = [
        len(encode_for_training(tiny_tokenizer, ex, "alpaca", 256)["input_ids"]) for ex in examples
    ]
    assert report["tokens"] == sum(lengths)
    assert [item["num_experts"] for item in report["layers"]] == [2, 4]
    weights = load_file(setup["tri"] / "adapter_model.safetensors")
    for item in report["layers"]:
        e = item["num_experts"]
        assert len(item["load"]) == e and math.isclose(sum(item["load"]), 1.0, abs_tol=1e-6)
        assert item["max_entropy"] == pytest.approx(math.log(e))
        assert set(item["modules"]) == set(report["modules"]) and len(report["modules"]) == 7
        for mod in item["modules"].values():
            ref = naive_redundancy(weights, mod["name"], scaling=8.0 / 4)
            assert mod["redundancy"] == pytest.approx(ref, rel=1e-6)
            assert len(mod["distances"]) == e and mod["tokens"] == sum(lengths)
    table = captured.out
    assert "entropy/logE" in table and "redundancy" in table and "wrote" in table
    assert str(out / "expert_load.png") in table

    # the PNGs are the figures the plot functions draw for this report, with content
    for name, draw in (("expert_load.png", plot_expert_load), ("entropy.png", plot_entropy)):
        image = pixels(out / name)
        fig = draw(report)
        width, height = fig.get_size_inches() * DPI
        assert image.shape == (round(height), round(width), 3)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(out):  # ordinary permissions, not a temp file's private 0600
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~umask
    heat = pixels(out / "expert_load.png")
    assert (heat == 255).all(axis=-1).mean() < 0.9  # not a blank canvas
    ax = plot_expert_load(report).axes[0]
    assert ax.images[0].get_array().mask[0, 2:].all()  # layer 0 has 2 of 4 experts


def test_default_output_and_weights_only(setup, capsys):
    adapter = setup["root"] / "tri-copy"
    make_adapter(setup["model"], adapter, [2, 4], 1, seed=1)
    rc = main(["analyze", "--adapter", str(adapter), "--weights-only", *common(setup)])
    assert rc == 0, capsys.readouterr().err
    out = adapter / "analysis"
    assert sorted(os.listdir(out)) == ["analysis.json", "redundancy.png"]
    report = strict_json(out / "analysis.json")
    assert report["has_routing"] is False and report["data"] is None
    assert all(item["load"] is None and item["redundancy"] > 0 for item in report["layers"])
    assert pixels(out / "redundancy.png").std() > 1.0


def test_compare_adapters_and_saved_analysis(setup, capsys):
    saved = setup["root"] / "saved"
    args = ["analyze", "--adapter", str(setup["square"]), "--output", str(saved)]
    assert main([*args, "--weights-only", *common(setup)]) == 0
    out = setup["root"] / "cmp"
    rc = main(
        [
            "analyze", "--compare", str(setup["tri"]), str(setup["square"]), str(saved),
            "--output", str(out), *common(setup, limit="3"),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(os.listdir(out)) == [
        "compare.json",
        "entropy_compare.png",
        "redundancy_compare.png",
    ]
    data = strict_json(out / "compare.json")
    labels = [run["label"] for run in data["runs"]]
    assert labels == ["tri (2,4)", "square (3) [1]", "square (3) [2]"]
    reports = [run["report"] for run in data["runs"]]
    assert [r["has_routing"] for r in reports] == [True, True, False]
    assert reports[0]["data"]["examples"] == 3
    runs = list(zip(labels, reports, strict=True))
    fig = plot_compare_redundancy(runs)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == labels
    np.testing.assert_allclose(lines[1].get_ydata(), lines[2].get_ydata())  # same adapter twice
    image = pixels(out / "redundancy_compare.png")
    width, height = fig.get_size_inches() * DPI
    assert image.shape == (round(height), round(width), 3) and image.std() > 1.0
    assert pixels(out / "entropy_compare.png").std() > 1.0
    assert "tri (2,4)" in captured.out and "Routing entropy / log(E) by layer" in captured.out


@pytest.mark.skipif(importlib.util.find_spec("evals") is None, reason="needs the evals package")
def test_default_task_sarcasm(setup, capsys):
    out = setup["root"] / "sarcasm"
    args = ["--model", str(setup["model"]), "--limit", "2", "--no-progress", "--output", str(out)]
    assert main(["analyze", "--adapter", str(setup["tri"]), *args]) == 0, capsys.readouterr().err
    report = strict_json(out / "analysis.json")
    assert report["data"]["task"] == "sarcasm" and report["data"]["examples"] == 2
    assert report["tokens"] > 0 and report["has_routing"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dead-threshold", "1.5"], "--dead-threshold"),
        (["--batch-size", "0"], "--batch-size"),
        (["--limit", "-1"], "--limit"),
        (["--device", "tpu:x"], "--device"),
    ],
)
def test_bad_options_exit_2(setup, capsys, extra, message):
    rc = main(["analyze", "--adapter", str(setup["tri"]), *common(setup), *extra])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"mola: error: {message}")


def test_bad_inputs_exit_2(setup, tmp_path, capsys):
    rc = main(["analyze", "--adapter", str(tmp_path / "missing"), *common(setup)])
    assert rc == 2 and "missing not found" in capsys.readouterr().err
    rc = main(["analyze", "--compare", str(setup["tri"]), *common(setup)])
    assert rc == 2 and "at least two" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    rc = main(["analyze", "--compare", str(bad), str(setup["tri"]), *common(setup)])
    assert rc == 2 and "not a mola analysis" in capsys.readouterr().err
    missing_data = ["--data", str(tmp_path / "nope.jsonl")]
    rc = main(["analyze", "--adapter", str(setup["tri"]), *common(setup), *missing_data])
    assert rc == 2 and "file not found" in capsys.readouterr().err
    for argv in (["analyze"], ["analyze", "--adapter", "a", "--compare", "b", "c"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mola: error: ")
