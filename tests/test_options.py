"""Training options: YAML + flags precedence, validation, and the MolaConfig they describe."""

from __future__ import annotations

import argparse

import pytest

from mola.training.options import TrainOptions, add_option_flags, options_from_args, read_yaml
from mola.training.trainer import last_checkpoint, training_arguments
from mola.utils.tables import metrics_table, table


def parse(argv):
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    return parser.parse_args(argv)


def test_defaults_and_config():
    opts = options_from_args(parse([]))
    assert opts == TrainOptions()
    cfg = opts.mola_config()
    assert cfg.num_experts == "inverted-triangle" and cfg.top_k == "2" and cfg.r == "8"
    assert cfg.resolve(30)["num_experts"].count(8) == 7


def test_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nexperts: [2, 4]\ntrain-on-inputs: true\nmax_steps: '7'\n")
    opts = options_from_args(parse([str(path), "--lr", "0.002"]), batch_size=3)
    assert opts.lr == 0.002 and opts.experts == "2,4" and opts.train_on_inputs
    assert opts.max_steps == 7 and opts.batch_size == 3
    assert options_from_args(parse(["--no-eval"])).eval is False


@pytest.mark.parametrize(
    "text,message",
    [
        ("lr: [1\n", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("learning_rate: 1\n", "unknown option 'learning_rate'"),
        ("max_steps: many\n", "max_steps must be a int"),
    ],
)
def test_bad_yaml(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_yaml(str(path))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": 0}, "--lr"),
        ({"epochs": 0}, "--epochs"),
        ({"router": "x"}, "--router: 'x' is not one of"),
        ({"experts": "2,,4"}, "--experts: empty item"),
        ({"experts": "2,0"}, "--experts: every value must be >= 1"),
        ({"r": "-1"}, "--r: every value must be >= 1"),
        ({"top_k": "3", "experts": "2"}, "--top-k: 3 is more than the 2 experts"),
        ({"top_k": "none"}, "--top-k: the 'topk' router needs"),
        ({"lr": float("inf")}, "--lr: must be a finite number > 0"),
        ({"lr": float("nan")}, "--lr: must be a finite number > 0"),
        ({"max_steps": 0}, r"--max-steps: must be an integer >= 1 \(or -1"),
        ({"max_steps": -5}, "--max-steps"),
        ({"warmup_ratio": 2.0}, r"--warmup-ratio: must be a finite number in \[0, 1\]"),
        ({"save_steps": -1}, "--save-steps: must be an integer >= 0"),
        ({"dropout": 1.0}, r"--dropout: must be a finite number in \[0, 1\)"),
        ({"top_p": 0.0}, r"--top-p: must be a finite number in \(0, 1\]"),
        ({"alpha": 0.0}, "--alpha"),
        ({"aux_loss_coef": -1.0}, "--aux-loss-coef"),
        ({"router_z_loss_coef": float("inf")}, "--router-z-loss-coef"),
        ({"weight_decay": -0.1}, "--weight-decay"),
        ({"grad_accum": 0}, "--grad-accum"),
        ({"cutoff_len": 1}, "--cutoff-len: must be an integer >= 2"),
        ({"logging_steps": 0}, "--logging-steps"),
        ({"eval_batch_size": 0}, "--eval-batch-size"),
        ({"train_limit": 0}, "--train-limit"),
        ({"eval_limit": -1}, "--eval-limit"),
        ({"seed": -1}, "--seed"),
        ({"seed": 2**32}, "--seed: must be < 2\\*\\*32"),
        ({"task": "nope"}, "--task: unknown task 'nope'"),
        ({"template": "nope"}, "--template: 'nope' is not one of"),
        ({"scoring": "nope"}, "--scoring"),
        ({"scheduler": "nope"}, "--scheduler: unknown schedule 'nope'"),
        ({"output": " "}, "--output: must be a non-empty string"),
        ({"model": ""}, "--model"),
        ({"data": ""}, "--data: empty file name"),
        ({"target_modules": "q_proj,,v_proj"}, "--target-modules: empty name"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainOptions(**kwargs).mola_config()


def test_training_arguments_schedule(tmp_path):
    args = training_arguments(
        TrainOptions(output=str(tmp_path), max_steps=40, warmup_ratio=0.1, save_steps=0),
        num_examples=100,
    )
    assert args.max_steps == 40 and args.warmup_steps == 4 and args.save_strategy == "no"
    assert args.remove_unused_columns is False


def test_last_checkpoint(tmp_path):
    assert last_checkpoint(str(tmp_path)) is None
    for step in (5, 20, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (5, 20):
        (tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"")
    assert last_checkpoint(str(tmp_path)).endswith("checkpoint-20")  # 100 holds no adapter


def test_tables():
    text = table(["name", "value"], [["a", 1.5], ["long name", 10]])
    lines = text.splitlines()
    assert lines[0] == "name        value" and set(lines[1]) == {"-", " "}
    assert lines[2] == "a          1.5000" and lines[3] == "long name      10"
    both = metrics_table({"zero_shot": {"accuracy": 0.5}, "fine_tuned": {"accuracy": 0.75}})
    assert "zero_shot" in both and "0.7500" in both


def test_structure_and_module_patterns_from_yaml_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "experts_structure: shared_a\na_dropout: 0.1\n"
        "module_patterns:\n  self_attn\\..*: {num_experts: 1, router: soft}\n"
    )
    cfg = options_from_args(parse([str(path), "--fly-sparsity", "0.25"])).mola_config()
    assert (cfg.experts_structure, cfg.a_dropout, cfg.fly_sparsity) == ("shared_a", 0.1, 0.25)
    assert cfg.module_patterns == {"self_attn\\..*": {"num_experts": 1, "router": "soft"}}
    flag = options_from_args(parse(["--module-patterns", '{"q_proj": {"r": 4}}']))
    assert flag.mola_config().module_patterns == {"q_proj": {"r": 4}}
    with pytest.raises(ValueError, match="^--module-patterns: invalid JSON"):
        options_from_args(parse(["--module-patterns", "{q_proj"])).mola_config()


@pytest.mark.parametrize("command", ["train", "demo", "allocate"])
@pytest.mark.parametrize("flag", ["--r", "--rank"])
def test_rank_flag_and_its_alias(command, flag):
    from mola.cli import build_parser

    args = build_parser(command).parse_args([flag, "4,4,8,8"])
    assert args.r == "4,4,8,8"
    assert options_from_args(args).r == "4,4,8,8"


def test_torchrun_passes_rank_to_the_script():
    """``--rank`` reaches mola through torchrun's parser (``--r`` is one of its abbreviations)."""
    from torch.distributed.run import get_args_parser

    launched = get_args_parser().parse_args(["mola", "train", "--rank", "4", "--output", "o"])
    assert launched.training_script_args == ["train", "--rank", "4", "--output", "o"]
