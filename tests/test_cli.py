"""The ``mola`` command line end to end on a tiny random model and a few rows of each form."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from mola.cli import main

MC_ROWS = [
    {"question": "Is the sky blue on a clear day?", "choices": ["yes", "no"], "answer": "yes"},
    {"question": "Is a brick lighter than a feather?", "choices": ["yes", "no"], "answer": "B"},
    {
        "question": "What color is the sky?",
        "choices": ["blue", "green", "red"],
        "answer": "A",
        "context": "The sky on a clear day.",
    },
] * 4
INSTRUCTION_ROWS = [
    {"instruction": "Name a fruit.", "output": "apple"},
    {"instruction": "Translate to French.", "input": "hello world", "output": "bonjour le monde"},
] * 4
FAST = [
    "--experts",
    "2,3",
    "--r",
    "4",
    "--batch-size",
    "4",
    "--logging-steps",
    "1",
    "--no-progress",
    "--eval-batch-size",
    "8",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in MC_ROWS) + "\n")
    (root / "inst.json").write_text(json.dumps(INSTRUCTION_ROWS))
    with open(root / "inst.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows({"input": "", **r} for r in INSTRUCTION_ROWS)
    return root


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, files, tmp_path_factory):
    """One real training run (MC data, evaluated before and after), shared by several tests."""
    out = tmp_path_factory.mktemp("run") / "out"
    code = main(
        [
            "train",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(files / "mc.jsonl"),
            "--eval-data",
            str(files / "mc.jsonl"),
            "--eval-before",
            "--max-steps",
            "4",
            "--save-steps",
            "2",
            "--output",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    return out


def test_train_writes_adapter_metrics_and_logs(trained):
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_config.yaml",
        "metrics.json",
        "train_log.jsonl",
        "predictions_fine_tuned.jsonl",
        "predictions_zero_shot.jsonl",
    ):
        assert (trained / name).is_file(), name
    assert (trained / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (trained / "model.safetensors").exists(), "only the adapter is saved"
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["allocation"]["num_experts"] == [2, 3]
    assert metrics["train"]["train_loss"] > 0
    for key in ("zero_shot", "fine_tuned"):
        assert metrics[key]["n"] == len(MC_ROWS) and 0 <= metrics[key]["accuracy"] <= 1
    logs = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    steps = [row for row in logs if "loss" in row]
    assert len(steps) == 4 and all("lm_loss" in r and "aux_loss" in r for r in steps)
    assert all(r["aux_loss"] > 0 for r in steps)
    preds = (trained / "predictions_fine_tuned.jsonl").read_text().splitlines()
    assert len(preds) == len(MC_ROWS) and "logprobs" in json.loads(preds[0])


def test_eval_reloads_adapter_with_identical_metrics(
    trained, tiny_llama_dir, files, tmp_path, capsys
):
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--adapter",
            str(trained),
            "--data",
            str(files / "mc.jsonl"),
            "--output",
            str(out),
            "--no-progress",
            "--batch-size",
            "5",
        ]
    )
    assert code == 0
    got = json.loads((out / "metrics.json").read_text())["metrics"]
    expected = json.loads((trained / "metrics.json").read_text())["fine_tuned"]
    for key in ("accuracy", "accuracy_norm", "n"):
        assert got[key] == pytest.approx(expected[key])
    assert "accuracy" in capsys.readouterr().out
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(MC_ROWS)


def test_eval_with_and_without_input_groups_scores_alike(trained, files, tmp_path):
    """Grouped modules (--group-inputs) give the per-module path's log-likelihoods."""
    records = {}
    for flag in ([], ["--group-inputs"]):
        out = tmp_path / ("eval" + "".join(flag))
        args = ["eval", "--adapter", str(trained), "--data", str(files / "mc.jsonl")]
        assert main([*args, "--output", str(out), "--no-progress", *flag]) == 0
        lines = (out / "predictions.jsonl").read_text().splitlines()
        records[bool(flag)] = [json.loads(line)["logprobs"] for line in lines]
    for alone, grouped in zip(records[False], records[True], strict=True):
        assert grouped == pytest.approx(alone, rel=1e-5, abs=1e-5)


def test_eval_base_model_zero_shot_matches_training_zero_shot(
    trained, tiny_llama_dir, files, tmp_path
):
    code = main(
        [
            "eval",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(files / "mc.jsonl"),
            "--output",
            str(tmp_path),
            "--no-progress",
            "--limit",
            "12",
        ]
    )
    assert code == 0
    got = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    expected = json.loads((trained / "metrics.json").read_text())["zero_shot"]
    assert got["accuracy"] == pytest.approx(expected["accuracy"])


def test_generate_streams_text(trained, capfd):
    code = main(
        [
            "generate",
            "--adapter",
            str(trained),
            "Name a fruit.",
            "--max-new-tokens",
            "5",
            "--no-progress",
        ]
    )
    assert code == 0
    assert capfd.readouterr().out.strip() != ""


@pytest.mark.parametrize("name", ["inst.json", "inst.csv"])
def test_train_on_instruction_data_reports_perplexity(tiny_llama_dir, files, tmp_path, name):
    code = main(
        [
            "train",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(files / name),
            "--eval-data",
            str(files / name),
            "--max-steps",
            "2",
            "--save-steps",
            "0",
            "--output",
            str(tmp_path),
            "--train-on-inputs",
            *FAST,
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["fine_tuned"]
    assert metrics["perplexity"] > 1 and metrics["n"] == len(INSTRUCTION_ROWS)


def test_yaml_config_with_flag_override(tiny_llama_dir, files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_llama_dir}\ndata: {files / 'mc.jsonl'}\nexperts: [2, 2]\n"
        f"top-k: 1\nr: 2\nmax_steps: 1\nrouter: switch\nsave_steps: 0\n"
    )
    code = main(
        [
            "train",
            str(config),
            "--experts",
            "3",
            "--output",
            str(tmp_path / "o"),
            "--no-progress",
            "--no-eval",
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert saved["allocation"]["num_experts"] == [3, 3]  # the flag wins over the file
    assert saved["router"] == "switch" and saved["allocation"]["r"] == [2, 2]


def test_resume_continues_from_last_checkpoint(tiny_llama_dir, files, tmp_path):
    args = [
        "train",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(files / "mc.jsonl"),
        "--save-steps",
        "2",
        "--output",
        str(tmp_path),
        *FAST,
    ]
    assert main([*args, "--max-steps", "2"]) == 0
    assert main([*args, "--max-steps", "4", "--resume"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2")
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_adapter_matches_in_memory_model_after_training(trained, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from mola import MolaModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = MolaModel.from_pretrained(base, trained).eval()
    b_norm = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    assert b_norm > 0, "training moved the experts' B matrices"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    ).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_gpt2_family_trains_through_cli(gpt2_dir, files, tmp_path):
    code = main(
        [
            "train",
            "--model",
            str(gpt2_dir),
            "--data",
            str(files / "mc.jsonl"),
            "--target-modules",
            "c_attn,c_proj,c_fc",
            "--max-steps",
            "1",
            "--no-eval",
            "--save-steps",
            "0",
            "--output",
            str(tmp_path),
            *FAST,
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_class"] == "GPT2LMHeadModel"


def bad_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make_args,message",
    [
        (
            lambda d, m, a, g: ["train", "--model", m, "--data", str(d / "missing.jsonl")],
            "missing.jsonl: file not found",
        ),
        (
            lambda d, m, a, g: [
                "train",
                "--model",
                m,
                "--data",
                bad_file(d, "bad.jsonl", '{"instruction": "a", "output": "b"}\n{x\n'),
            ],
            "bad.jsonl line 2",
        ),
        (
            lambda d, m, a, g: [
                "train",
                "--model",
                m,
                "--data",
                bad_file(d, "nofield.jsonl", '{"question": "q", "choices": ["a"]}\n'),
            ],
            "missing field 'answer'",
        ),
        (
            lambda d, m, a, g: [
                "train",
                "--model",
                m,
                "--data",
                bad_file(
                    d, "wrong.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": "c"}\n'
                ),
            ],
            "not one of the choices",
        ),
        (lambda d, m, a, g: ["train", "--model", m, "--task", "nope"], "unknown task 'nope'"),
        (lambda d, m, a, g: ["train", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (
            lambda d, m, a, g: ["train", "--model", m, "--experts", "2,2,3"],
            "num_experts: got 3 values for 2 decoder layers",
        ),
        (
            lambda d, m, a, g: ["train", "--model", m, "--experts", "2", "--top-k", "3"],
            "--top-k: 3 is more than the 2 experts",
        ),
        (
            lambda d, m, a, g: ["train", "--model", m, "--experts", "2", "--target-modules", "foo"],
            "matches no module",
        ),
        (
            lambda d, m, a, g: ["train", bad_file(d, "c.yaml", "learning_rate: 1\n")],
            "unknown option 'learning_rate'",
        ),
        (
            lambda d, m, a, g: ["eval", "--adapter", a, "--model", g, "--limit", "2"],
            "trained on a LlamaForCausalLM",
        ),
        (
            lambda d, m, a, g: ["eval", "--adapter", str(d), "--model", m],
            "adapter_config.json not found",
        ),
    ],
    ids=[
        "missing-file",
        "bad-jsonl-line",
        "missing-field",
        "bad-answer",
        "unknown-task",
        "unknown-model",
        "bad-spec",
        "top-k",
        "no-targets",
        "yaml-key",
        "wrong-base",
        "not-adapter",
    ],
)
def test_bad_input_one_line_exit_2(
    make_args, message, tmp_path, tiny_llama_dir, trained, gpt2_dir, capsys
):
    args = make_args(tmp_path, str(tiny_llama_dir), str(trained), str(gpt2_dir))
    code = main([*args, "--output", str(tmp_path / "o")] if args[0] == "train" else args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("mola: error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_console_script_entry_point(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mola.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0 and "train" in run.stdout and "analyze" in run.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mola.cli",
            "train",
            "--data",
            str(tmp_path / "x.csv"),
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    expected = f"mola: error: {tmp_path / 'x.csv'}: file not found"
    assert run.returncode == 2 and run.stderr.strip() == expected
    assert main(["frobnicate"]) == 2
