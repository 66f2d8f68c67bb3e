"""The authors' defaults: what a router or preset does without further options (issue 21)."""

from __future__ import annotations

import pytest
import torch
from models import build

from mola import MolaConfig, get_mola_model
from mola.experts import StructureOptions
from mola.experts.flylora import FlyLoRAExperts
from mola.methods import apply_method, method_settings
from mola.routing.sparsegen import authors_hidden
from mola.training.options import TrainOptions


def preset_config(name: str, **override) -> MolaConfig:
    return TrainOptions(**apply_method({"method": name, **override})).mola_config()


def test_one_expert_with_the_default_top_k_is_a_plain_lora():
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=1))  # top_k stays at its default 2
    assert not any("router" in n for n, _ in model.named_parameters())
    assert model.allocation["top_k"] == [1] * 4
    ids = torch.randint(3, 97, (2, 5))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss.item() == 0.0
    TrainOptions(experts="1")  # the CLI accepts it too


def test_dynmole_without_the_preset_uses_the_authors_top_p_and_entropy_weight():
    base, _, _ = build("llama")
    config = MolaConfig(router="dynmole", num_experts=4)
    model = get_mola_model(base, config)
    assert {layer.routing.top_p for _, layer in model.mola_layers()} == {0.75}
    assert config.loss_coef("entropy_loss") == 0.01
    assert TrainOptions(router="dynmole", experts="4").mola_config().entropy_loss_coef == 0.01
    topp = get_mola_model(build("llama")[0], MolaConfig(router="topp", num_experts=4))
    assert {layer.routing.top_p for _, layer in topp.mola_layers()} == {0.5}


def test_ldmole_hidden_follows_the_authors_configs_by_model_size():
    assert [authors_hidden(n) for n in (6e8, 1.24e9, 1.7e9, 3.2e9, 8e9)] == [
        128, 128, 256, 256, 512
    ]  # fmt: skip
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(router="ldmole", num_experts=4))
    assert model.mola_config.ldmole_hidden == 128
    layer = next(layer for _, layer in model.mola_layers())
    assert layer.routing.lambda_mlp.hidden_weight.shape[0] == 128
    assert model.adapter_config()["ldmole_hidden"] == 128  # saved: the adapter reloads
    wide = get_mola_model(build("llama")[0], MolaConfig(router="ldmole", ldmole_hidden=16))
    assert wide.mola_config.ldmole_hidden == 16


def test_adamole_preset_is_the_authors_configuration():
    config = preset_config("adamole")
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.r == "4" and config.num_experts == "8"  # lora_rank 32 // num_experts 8
    assert config.lora_alpha == 16.0 and config.lora_dropout == 0.05
    assert config.top_k is None and config.reduction("adamole") == "module_sum"


def test_ldmole_preset_is_the_authors_configuration():
    config = preset_config("ld-mole")
    assert (config.r, config.lora_alpha, config.lora_dropout) == ("8", 16.0, 0.1)
    assert config.aux_loss_coef == 1.0 and config.sparsity_loss_coef == 0.0


def test_remoe_preset_starts_the_adaptive_l1_at_the_authors_value():
    settings = method_settings("remoe")
    assert settings["router"] == "relu" and settings["l1_loss_coef"] == 1e-8
    config = preset_config("remoe")
    assert config.l1_loss_coef == 1e-8 and config.l1_loss_alpha == 1.2
    base, _, _ = build("llama")
    model = get_mola_model(base, config)
    assert model.l1_schedule is not None and model.l1_schedule.coef == 1e-8
    model.train()
    ids = torch.randint(3, 97, (2, 5))
    out = model(input_ids=ids, labels=ids)
    assert out.l1_loss.item() > 0
    model.l1_schedule.step()
    assert model.l1_schedule.coef != 1e-8  # it moves: x or / 1.2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(router="relu", l1_loss_coef=0.0), "l1_loss_coef: 0 never changes"),
        (dict(router="relu", top_k=None), "top_k: ReMoE's adaptive L1"),
    ],
)
def test_adaptive_l1_that_can_never_act_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        MolaConfig(**kw)
    MolaConfig(**kw, l1_loss_alpha=1.0)  # a fixed weight is fine


def test_adaptive_l1_refusal_is_one_cli_line(capsys, tmp_path):
    from mola.cli import main

    code = main(["train", "--method", "remoe", "--l1-loss-coef", "0", "--output", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mola: error: ")
    assert "l1_loss_coef: 0 never changes" in err[0]


@pytest.mark.parametrize("r, k", [(8, 3), (32, 8), (6, 4)])
def test_flylora_nonzeros_per_row_are_the_authors(r, k):
    d = 29
    experts = FlyLoRAExperts(d, 7, r, r, 2.0 * r, StructureOptions(top_k=k))
    want = d // (r // k)
    assert experts.nonzeros == want
    assert torch.equal((experts.lora_A != 0).sum(dim=1), torch.full((r,), want))


@pytest.mark.parametrize("structure", ["flylora", "rankwise"])
def test_balance_bias_moves_once_per_step_under_activation_checkpointing(structure):
    def run(checkpointing: bool) -> list[torch.Tensor]:
        base, _, _ = build("llama")
        config = MolaConfig(
            experts_structure=structure, r=8, top_k=2, balance_bias_rate=0.01,
            target_modules=["up_proj"], lora_dropout=0.0,
        )  # fmt: skip
        model = get_mola_model(base, config)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        torch.manual_seed(3)
        for _ in range(3):
            ids = torch.randint(3, 97, (2, 7))
            model(input_ids=ids, labels=ids).loss.backward()
        layers = [layer.experts for _, layer in model.mola_layers()]
        return [e.balance_bias().clone() for e in layers]

    plain, ckpt = run(False), run(True)
    assert any(b.abs().sum() > 0 for b in plain)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)
