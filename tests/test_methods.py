"""Method presets: ``mola train --method NAME`` trains a tiny model end to end; precedence."""

from __future__ import annotations

import argparse
import json

import pytest

from mola.cli import main
from mola.methods import METHODS, apply_method
from mola.training.options import add_option_flags, options_from_args

ROWS = [
    {"question": "Is fire hot?", "choices": ["no", "yes"], "answer": "yes", "group": 0},
    {"question": "Is ice hot?", "choices": ["no", "yes"], "answer": "no", "group": 1},
    {"question": "Is snow cold?", "choices": ["no", "yes"], "answer": "yes"},
] * 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("methods") / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_end_to_end(name, tiny_llama_dir, data, tmp_path):
    out = tmp_path / name
    argv = ["train", "--method", name, "--model", str(tiny_llama_dir), "--data", str(data)]
    argv += ["--max-steps", "20", "--batch-size", "4", "--logging-steps", "10", "--save-steps"]
    argv += ["0", "--no-eval", "--no-progress", "--cutoff-len", "32", "--output", str(out)]
    argv += ["--experts", "2,3"]  # the tiny model has 2 decoder layers (small and fast)
    if name == "hilo":  # its ranks are a 4-group spec too
        argv += ["--r", "2,4"]
    assert main(argv) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    for key, value in METHODS[name].settings.items():
        field = {"experts": "num_experts", "alpha": "lora_alpha"}.get(key, key)
        if field in config and not isinstance(value, str):
            assert config[field] == value, key
    if "router" in METHODS[name].settings:
        assert config["router"] == METHODS[name].settings["router"]
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    logged = [row for row in logs if "lm_loss" in row]
    assert len(logged) == 2 and all(row["loss"] == row["loss"] for row in logged)  # not NaN
    expected = {"router": config["router"]}
    extra = {
        "ldmole": "sparsity_loss",
        "dynmole": "entropy_loss",
        "loramoe": "lbc_loss",
    }.get(expected["router"])
    assert "aux_loss" in logged[0]
    if extra:
        assert extra in logged[0], f"{extra} is logged apart"


def parse(argv, tmp_path=None):
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    return options_from_args(parser.parse_args(argv))


def test_flags_and_yaml_override_the_preset(tmp_path):
    opts = parse(["--method", "mixlora", "--experts", "4", "--aux-loss-coef", "0.5"])
    cfg = opts.mola_config()
    assert cfg.num_experts == "4" and cfg.aux_loss_coef == 0.5
    assert cfg.router_scope == "block" and cfg.target_modules == [
        *["q_proj", "k_proj", "v_proj", "o_proj"],
        *["gate_proj", "up_proj", "down_proj"],
    ]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("method: dynmole\ntop_p: 0.5\n")
    cfg = parse([str(yaml_file), "--entropy-loss-coef", "0.2"]).mola_config()
    assert (cfg.router, cfg.top_p, cfg.entropy_loss_coef) == ("dynmole", 0.5, 0.2)
    assert parse([]).mola_config().router == "topk"
    assert apply_method({"method": "mola", "lr": 1.0}) == {"method": "mola", "lr": 1.0}


def test_unknown_method_is_one_error_line(capsys):
    assert main(["train", "--method", "nope", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mola: error:") and "nope" in err[0]


def test_methods_command_lists_every_preset(capsys):
    assert main(["methods", "--settings"]) == 0
    out = capsys.readouterr().out
    for m in METHODS.values():
        assert m.name in out and m.paper in out
    assert "router_scope=block" in out


@pytest.mark.parametrize(("name", "experts"), [("mixlora", 8), ("llava-mole", 3)])
def test_block_presets_put_a_plain_lora_on_attention(name, experts):
    import torch
    from models import build

    from mola import get_mola_model

    cfg = parse(["--method", name]).mola_config()
    base, _, _ = build("llama")
    model = get_mola_model(base, cfg)
    layers = dict(model.mola_layers())
    assert len(layers) == 7 * 4  # q/k/v/o and gate/up/down in each of the 4 blocks
    for module, layer in layers.items():
        if ".self_attn." in module:  # one expert, no router: a plain LoRA
            assert (layer.num_experts, layer.routing) == (1, None), module
        else:  # the MLP's experts, routed by the block's one router
            assert layer.num_experts == experts and layer.shared is not None, module
            assert layer.routing is model.base_model.get_submodule(module.rsplit(".", 1)[0]).router
    routers = [n for n, _ in model.named_parameters() if "router" in n]
    assert routers == [f"base_model.model.layers.{i}.mlp.router.weight" for i in range(4)]
    ids = torch.randint(0, 97, (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    attention = layers["model.layers.0.self_attn.q_proj"]
    assert all(p.grad is not None for p in attention.parameters() if p.requires_grad)
