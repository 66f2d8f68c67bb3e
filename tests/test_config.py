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
