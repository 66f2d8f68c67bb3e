"""MolaConfig defaults, validation and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from mola import MolaConfig


def test_defaults():
    cfg = MolaConfig()
    assert cfg.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.top_k) == (8, 16, 0.05, 2)
    assert (cfg.router, cfg.aux_loss_coef, cfg.router_z_loss_coef) == ("topk", 0.001, 0.0)


@pytest.mark.parametrize(
    "cfg",
    [
        MolaConfig(),
        MolaConfig(num_experts=[2, 4, 6, 8], top_k=[1, 2, 2, 2], r="4,8", router="topp", top_p=0.7),
        MolaConfig(target_modules="model\\.layers\\.\\d+\\.mlp\\..*", router="soft", top_k=None),
    ],
)
def test_round_trip(cfg, tmp_path):
    assert MolaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save(tmp_path / "c.json")
    assert MolaConfig.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"router": "mixtral"}, "^router: unknown router 'mixtral'; choose from topk"),
        ({"lora_alpha": 0}, "^lora_alpha:"),
        ({"lora_dropout": 1.0}, "^lora_dropout:"),
        ({"target_modules": []}, "^target_modules: empty"),
        ({"aux_loss_coef": -1}, "aux_loss_coef"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MolaConfig(**kwargs)


def test_unknown_field_rejected():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        MolaConfig.from_dict({"rank": 4})


def test_module_patterns_override_per_module():
    cfg = MolaConfig(
        num_experts="2,4",
        r=8,
        module_patterns={
            r"self_attn\.\w+_proj": {"num_experts": 1, "top_k": 1, "lora_alpha": 32},
            "down_proj": {"r": [4, 16], "router": "soft", "top_k": None},
            "mlp\\..*": {"num_experts": 6},  # never reached for down_proj: first match wins
        },
    )
    q = cfg.module_spec("model.layers.3.self_attn.q_proj", 3, 4)
    assert (q.num_experts, q.top_k, q.r, q.lora_alpha, q.router) == (1, 1, 8, 32.0, "topk")
    down = cfg.module_spec("model.layers.0.mlp.down_proj", 0, 4)
    assert (down.num_experts, down.r, down.router, down.top_k) == (2, 4, "soft", None)
    assert cfg.module_spec("model.layers.3.mlp.down_proj", 3, 4).r == 16
    up = cfg.module_spec("model.layers.1.mlp.up_proj", 1, 4)
    assert (up.num_experts, up.r, up.lora_alpha, up.experts_structure) == (6, 8, 16.0, "stacked")
    # a pattern matches at a name boundary only
    assert cfg.module_spec("model.layers.1.mlp.xdown_proj", 1, 4).num_experts == 6
    assert MolaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_rank_wise_structures_have_one_expert_per_rank():
    cfg = MolaConfig(experts_structure="rankwise", r=[8, 16], num_experts=3, top_k=4)
    assert cfg.module_spec("m.layers.1.q_proj", 1, 2).num_experts == 16
    with pytest.raises(ValueError, match="top_k: 4 is more than the 2 experts"):
        MolaConfig(experts_structure="flylora", r=2, top_k=4).module_spec("q_proj", 0, 1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"experts_structure": "hydra"}, "^experts_structure: unknown structure 'hydra'"),
        ({"module_patterns": {"q_proj": {"rank": 4}}}, r"unknown key\(s\) \['rank'\]"),
        ({"module_patterns": {"(": {"r": 4}}}, "bad regex"),
        ({"module_patterns": ["q_proj"]}, "expected a mapping"),
        ({"a_dropout": 1.0}, "^a_dropout:"),
        ({"fly_sparsity": 0.0}, "^fly_sparsity:"),
    ],
)
def test_bad_structure_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MolaConfig(**kwargs)


def test_bad_pattern_value_names_the_pattern():
    cfg = MolaConfig(module_patterns={"q_proj": {"lora_alpha": "big"}})
    with pytest.raises(ValueError, match=r"module_patterns\['q_proj'\]: lora_alpha"):
        cfg.module_spec("model.layers.0.self_attn.q_proj", 0, 2)
