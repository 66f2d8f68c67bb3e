"""``mola allocate``: budget arithmetic, GSV layer, the bilevel search, YAML round trip, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mola.allocators import guilomo, redundancy
from mola.allocators.agreement import agreement_line, correlation, seed_agreement
from mola.allocators.budget import (
    LayerCost,
    apportion,
    experts_at_rank,
    fit_budget,
    fit_experts,
    fit_params,
    trainable_params,
)
from mola.allocators.gsv import ExpertCountBias, GSVLinear, RankMask, attach_gsvs, prefix_mask
from mola.allocators.probe import cycle, layer_costs, probe_model
from mola.cli import main
from mola.core.allocation_file import check_fits, read_allocation, write_allocation
from mola.core.checkpoint import is_adapter_name
from mola.core.config import MolaConfig
from mola.core.layer import MolaLinear
from mola.core.model import MolaModel
from mola.training.options import TrainOptions

# ----------------------------------------------------------------------------- budget arithmetic


def test_apportion_is_proportional_exact_and_respects_minimum():
    assert apportion([1, 1, 2, 4], 16, [1, 1, 1, 1]) == [3, 2, 4, 7]  # 4 + 12 * w / 8
    assert sum(apportion([0.3, 0.3, 0.4], 10, [1, 1, 1])) == 10
    # a layer with weight 0 keeps its minimum
    assert apportion([0, 0, 1, 1], 10, [2, 2, 2, 2]) == [2, 2, 3, 3]
    assert apportion([0, 0, 0], 7, [1, 1, 1]) == [3, 2, 2]  # all-zero weights: uniform
    with pytest.raises(ValueError):
        apportion([1, 1], 3, [2, 2])


@pytest.mark.parametrize("seed", range(5))
def test_fit_experts_exact_with_top_k_floor(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 12)
    weights = [rng.random() * rng.choice([0, 1, 5]) for _ in range(layers)]
    top_k = [rng.randint(1, 3) for _ in range(layers)]
    budget = sum(top_k) + rng.randint(0, 40)
    experts = fit_experts(weights, budget, top_k)
    assert sum(experts) == budget
    assert all(e >= max(1, k) for e, k in zip(experts, top_k, strict=True))
    with pytest.raises(ValueError, match="--budget"):
        fit_experts(weights, sum(top_k) - 1, top_k)


@pytest.mark.parametrize("seed", range(5))
def test_fit_params_within_one_rank_unit(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 8)
    costs = [LayerCost(rng.randint(50, 400), rng.randint(20, 200)) for _ in range(layers)]
    top_k = [2] * layers
    smallest = trainable_params([2] * layers, [1] * layers, costs)
    budget = smallest + rng.randint(0, 60_000)
    e_w = [rng.random() for _ in range(layers)]
    r_w = [rng.random() + 0.1 for _ in range(layers)]
    experts, ranks = fit_params(e_w, r_w, budget, costs, top_k, total_experts=rng.randint(2, 40))
    params = trainable_params(experts, ranks, costs)
    units = [e * c.rank_unit for e, c in zip(experts, costs, strict=True)]
    assert params <= budget < params + min(units)  # no layer's next rank would still fit
    assert all(e >= 2 for e in experts) and all(r >= 1 for r in ranks)
    with pytest.raises(ValueError, match="--budget"):
        fit_params(e_w, r_w, smallest - 1, costs, top_k, total_experts=10)


def test_fit_budget_by_experts_keeps_ranks_and_by_params_fills():
    costs = [LayerCost(100, 40)] * 4
    experts, ranks = fit_budget(
        "experts", 12, [0, 0, 1, 1], [1] * 4, costs, [2] * 4, ranks=[4, 4, 8, 8], total_experts=0
    )
    assert experts == [2, 2, 4, 4] and ranks == [4, 4, 8, 8]
    total = experts_at_rank([1, 1, 1, 1], 20_000, costs, [2] * 4, 8)
    assert trainable_params(apportion([1] * 4, total, [2] * 4), [8] * 4, costs) <= 20_000
    assert trainable_params(apportion([1] * 4, total + 1, [2] * 4), [8] * 4, costs) > 20_000
    with pytest.raises(ValueError, match="--by"):
        fit_budget("layers", 12, [1] * 4, [1] * 4, costs, [2] * 4, ranks=[8] * 4, total_experts=8)


# ----------------------------------------------------------------------------- the GSV layer


def test_prefix_mask_is_hard_forward_soft_backward():
    logits = torch.tensor([0.1, 2.0, -1.0, 0.5], requires_grad=True)
    mask = prefix_mask(logits, tau=1.0, sample=False)
    assert mask.tolist() == [1.0, 1.0, 0.0, 0.0]  # argmax candidate 1: keep components 0..1
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (mask * weights).sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    soft = torch.softmax(reference, dim=-1).flip(-1).cumsum(-1).flip(-1)
    (soft * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad)


def _linear_pair(top_k: int = 2) -> tuple[MolaLinear, GSVLinear]:
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    plain = MolaLinear(base, num_experts=4, r=3, lora_alpha=6, top_k=top_k)
    gsv = GSVLinear(plain, min_experts=top_k, estimator="gumbel")
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(gsv, name).copy_(torch.randn_like(getattr(gsv, name)))
        plain.lora_A.copy_(gsv.lora_A)
        plain.lora_B.copy_(gsv.lora_B)
        plain.router.weight.copy_(gsv.router.weight)
    return plain, gsv


def test_gsv_linear_with_everything_chosen_equals_molalinear():
    plain, gsv = _linear_pair()
    with torch.no_grad():
        gsv.lora_gsv_experts[-1] = 5.0  # argmax: all 4 experts
        gsv.lora_gsv_ranks[:, -1] = 5.0  # argmax: full rank 3
    gsv.eval()
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(gsv(x), plain(x))
    assert gsv.chosen() == (4, [3, 3, 3, 3])


def test_gsv_linear_masks_experts_and_ranks():
    _, gsv = _linear_pair()
    gsv.eval()  # zero GSVs: argmax is the smallest candidate, 2 experts of rank 1
    x = torch.randn(7, 12)
    with torch.no_grad():
        a = gsv.lora_A.clone()
        a[:, 1:] = 0  # rank 1: only each expert's first rank component
        logits = gsv.router(x)
        logits[:, 2:] = -1e4  # only the first two experts are routable
        gates, _ = gsv.routing.route(logits)
        h = torch.einsum("nd,erd->ner", x, a) * gates.unsqueeze(-1) * gsv.scaling
        expected = gsv.base_layer(x) + torch.einsum("ner,eor->no", h, gsv.lora_B)
        torch.testing.assert_close(gsv(x), expected)
    assert gates[:, 2:].abs().max() == 0
    assert gsv.chosen() == (2, [1, 1, 1, 1])


def test_gsvs_get_gradients_and_names_are_adapter_names():
    _, gsv = _linear_pair()
    gsv.train()
    gsv(torch.randn(6, 12)).pow(2).sum().backward()
    assert gsv.lora_gsv_experts.grad is not None and gsv.lora_gsv_ranks.grad is not None
    assert gsv.lora_gsv_ranks.grad.abs().sum() > 0
    names = [n for n, p in gsv.named_parameters() if p.requires_grad]
    assert names and all(is_adapter_name(n) for n in names)


# ----------------------------------------------------------------------------- the search

VOCAB = 40


def _two_group_model(seed: int = 0) -> LlamaForCausalLM:
    """4 layers; the bottom two are identities whose adapted modules only ever see zeros.

    Their norms' weights are zero, so every q/k/v/gate/up input is 0 and so are o_proj's and
    down_proj's: adapters there can do nothing, so only the top layers can fit the task.
    """
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[:2]:
            layer.input_layernorm.weight.zero_()
            layer.post_attention_layernorm.weight.zero_()
    return model


def _lookup_batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``[a, SEP, f(a)]`` with a fixed random table ``f``; the loss is on ``f(a)`` only."""
    table = torch.randint(20, VOCAB, (20,), generator=torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        a = torch.randint(0, 20, (8, 1), generator=gen)
        ids = torch.cat([a, torch.full_like(a, 1), table[a]], dim=1)
        labels = ids.clone()
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


SEARCH_CONFIG = MolaConfig(
    target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    top_k=2,
    lora_dropout=0.0,
)


def test_bilevel_search_puts_the_budget_where_the_task_can_be_fit():
    model = probe_model(_two_group_model(), SEARCH_CONFIG, num_experts=4, r=4)
    costs = layer_costs(model)
    found = guilomo.search(
        model, cycle(_lookup_batches(12, 1), 0), cycle(_lookup_batches(4, 2), 1), 25, lr=1e-2,
        gsv_lr=0.1, gsv_weight_decay=1e-3, gsv_betas=(0.9, 0.999), estimator="gumbel",
    )  # fmt: skip
    assert len(found.experts) == len(found.ranks) == 4
    assert found.history[-1]["heldout_loss"] < found.history[0]["heldout_loss"]
    # no gradient ever reaches the bottom GSVs: they read off the smallest candidates
    assert found.experts[:2] == [2.0, 2.0] and found.ranks[:2] == [1.0, 1.0]
    assert min(found.experts[2:]) > 2.0 and min(found.ranks[2:]) > 1.0
    extra_e = [e - 2 for e in found.experts]  # evidence above the smallest candidates
    extra_r = [r - 1 for r in found.ranks]
    own_ranks = [round(r) for r in found.ranks]
    experts, ranks = fit_budget(
        "experts", 16, extra_e, extra_r, costs, [2] * 4, ranks=own_ranks, total_experts=0
    )
    assert sum(experts) == 16 and experts[:2] == [2, 2] and sum(experts[2:]) == 12
    budget = trainable_params([3] * 4, [3] * 4, costs)
    own_total = sum(round(e) for e in found.experts)
    experts, ranks = fit_budget(
        "params", budget, extra_e, extra_r, costs, [2] * 4, ranks=own_ranks, total_experts=own_total
    )
    assert trainable_params(experts, ranks, costs) <= budget
    assert experts[2] + experts[3] > experts[0] + experts[1] and ranks[2:] > ranks[:2]


def test_redundancy_probe_gives_the_budget_to_layers_whose_experts_differ():
    model = probe_model(_two_group_model(), SEARCH_CONFIG, num_experts=3, r=4)
    found = redundancy.measure(
        model, cycle(_lookup_batches(8, 1), 0), _lookup_batches(2, 2), 10, lr=1e-2
    )
    assert found.redundancy[:2] == [0.0, 0.0] and min(found.redundancy[2:]) > 0
    assert all(0.0 <= e <= 1.0 + 1e-6 for e in found.entropy)
    assert fit_experts(found.redundancy, 12, [2] * 4)[:2] == [2, 2]


def test_attach_gsvs_replaces_every_layer():
    model = probe_model(_two_group_model(), SEARCH_CONFIG, num_experts=3, r=2)
    layers = attach_gsvs(model.base_model)
    assert len(layers) == 4 * 5 and all(isinstance(m, GSVLinear) for _, m in model.mola_layers())
    # q 32->32, v 32->16, o 32->32, up 32->48, down 48->32
    unit = (32 + 32) + (32 + 16) + (32 + 32) + (32 + 48) + (48 + 32)
    assert layer_costs(model)[0] == LayerCost(rank_unit=unit, router=32 * 4 + 48)


# ----------------------------------------------------------------------------- YAML round trip


def test_yaml_round_trip_and_train_options(tmp_path):
    path = tmp_path / "alloc.yaml"
    data = {"num_experts": [2, 3, 5, 6], "r": [8, 4, 4, 2], "top_k": 2, "num_layers": 4}
    write_allocation(path, {**data, "strategy": "guilomo", "scores": {"x": [0.123456, 1.0]}})
    back = read_allocation(path)
    assert {k: back[k] for k in data} == data and back["scores"]["x"] == [0.1235, 1.0]
    config = TrainOptions(allocation=str(path), experts="square", r="16").mola_config()
    assert config.resolve(4) == {"num_experts": [2, 3, 5, 6], "top_k": [2] * 4, "r": [8, 4, 4, 2]}
    check_fits(back, 4)
    with pytest.raises(ValueError, match="8 decoder layers"):
        check_fits(back, 8)
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_experts: [2, 0]\nr: [1, 1]\n")
    with pytest.raises(ValueError, match="num_experts"):
        read_allocation(bad)
    bad.write_text("r: [1, 1]\n")
    with pytest.raises(ValueError, match="needs num_experts"):
        read_allocation(bad)
    with pytest.raises(ValueError, match="not found"):
        read_allocation(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- CLI end to end

ROWS = [
    {"question": "Is the sky blue on a clear day?", "choices": ["yes", "no"], "answer": "yes"},
    {"question": "Is a brick lighter than a feather?", "choices": ["yes", "no"], "answer": "B"},
] * 6


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("alloc-data") / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


FAST = ["--max-experts", "3", "--r", "4", "--probe-steps", "3", "--batch-size", "4"]
FAST += ["--no-progress", "--target-modules", "q_proj,v_proj,down_proj"]


@pytest.mark.parametrize("strategy", ["guilomo", "redundancy"])
def test_cli_allocate_then_train(tiny_llama_dir, mc_file, tmp_path, capsys, strategy):
    out = tmp_path / "alloc.yaml"
    args = ["allocate", "--model", str(tiny_llama_dir), "--data", str(mc_file)]
    code = main([*args, "--budget", "5", "--strategy", strategy, "--output", str(out), *FAST])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"mola allocate ({strategy}, --by experts 5): 5 experts over 2 layers")
    assert "trainable params" in line and "probe" in line
    alloc = read_allocation(out)
    assert sum(alloc["num_experts"]) == 5 and min(alloc["num_experts"]) >= 2
    assert (tmp_path / "alloc.png").read_bytes()[:4] == b"\x89PNG"
    run = tmp_path / "run"
    code = main(
        ["train", "--model", str(tiny_llama_dir), "--data", str(mc_file), "--allocation", str(out),
         "--target-modules", "q_proj,v_proj,down_proj", "--max-steps", "1", "--batch-size", "4",
         "--no-progress", "--no-eval", "--output", str(run), "--save-steps", "0"]
    )  # fmt: skip
    assert code == 0
    saved = json.loads((run / "adapter_config.json").read_text())["allocation"]
    assert saved["num_experts"] == alloc["num_experts"] and saved["r"] == alloc["r"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainable_params"] == alloc["trainable_params"]


def test_cli_allocate_by_params_and_user_errors(tiny_llama_dir, mc_file, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    args = ["allocate", "--model", str(tiny_llama_dir), "--data", str(mc_file), *FAST]
    assert main([*args, "--by", "params", "--budget", "30000", "--output", str(out)]) == 0
    alloc = read_allocation(out)
    assert alloc["trainable_params"] <= 30000 and alloc["by"] == "params"
    capsys.readouterr()
    assert main([*args, "--output", str(out)]) == 2
    assert "--budget: required" in capsys.readouterr().err
    assert main([*args, "--budget", "3", "--output", str(out)]) == 2
    assert "--budget: 3 experts is too few" in capsys.readouterr().err
    assert main([*args, "--budget", "9", "--top-k", "4", "--output", str(out)]) == 2
    assert "--top-k 4 exceeds --max-experts 3" in capsys.readouterr().err


def test_allocate_help_shows_only_the_options_it_uses(capsys):
    from dataclasses import fields

    from mola.allocators.job import AllocateOptions
    from mola.cli import build_parser
    from mola.training.options import TrainOptions

    hidden = AllocateOptions.NO_FLAG
    assert hidden < {f.name for f in fields(TrainOptions)}  # no misspelt field name
    text = build_parser("allocate").format_help()
    flags = {word.strip("[],").split("=")[0] for word in text.split() if word.startswith("--")}
    for name in hidden:
        assert "--" + name.replace("_", "-") not in flags, name
    for name in ("model", "data", "top_k", "r", "lr", "batch_size", "budget", "probe_steps"):
        assert "--" + name.replace("_", "-") in flags, name
    assert main(["allocate", "--budget", "4", "--epochs", "2"]) == 2  # ignored before: refused now
    assert "unrecognized arguments: --epochs" in capsys.readouterr().err
    assert main(["train", "--epochs", "0"]) == 2  # train keeps its flags
    assert "--epochs" in capsys.readouterr().err


def test_demo_banner_names_the_allocation(tmp_path):
    from mola.cli import build_parser
    from mola.commands.demo import DEMO_RECIPE, banner
    from mola.training.options import options_from_args

    path = tmp_path / "alloc.yaml"
    path.write_text("num_experts: [2, 4, 6]\nr: [4, 4, 8]\ntop_k: 1\n")
    args = build_parser("demo").parse_args(["--allocation", str(path)])
    line = banner(options_from_args(args, **DEMO_RECIPE))
    assert f"experts 2,4,6, top-1, r 4,4,8 (from {path})" in line, line
    assert "inverted-triangle" not in line
    line = banner(options_from_args(build_parser("demo").parse_args([]), **DEMO_RECIPE))
    assert "on sarcasm, experts inverted-triangle, top-2, r 8, 120 steps of 8" in line, line


# ------------------------------------------------------------- the authors' GSVs (Gui-LoMo)


def test_authors_gsv_masks_and_their_backward():
    """GAMoEGateBackward / _E of ArMoLA/src/mola_lora_hacked.py, on hand-picked scores."""
    s = torch.tensor([0.2, 0.3, 0.9, 0.1], requires_grad=True)
    bias = ExpertCountBias.apply(s, 2)
    assert bias.tolist() == [0.5, 0.5, 0.5, -1e4]  # argmax 2: experts 0..2 routable
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (bias * g).sum().backward()
    want = torch.zeros(4)
    want[2] = 1.0 * 0.2 + 2.0 * 0.3 + 3.0 * 0.9  # cumsum(grad * s) at the argmax, 0 elsewhere
    torch.testing.assert_close(s.grad, want)
    low = torch.tensor([0.9, 0.1, 0.2], requires_grad=True)
    assert ExpertCountBias.apply(low, 2).tolist() == [0.5, 0.5, -1e4]  # argmax 0 -> keep 2
    r = torch.tensor([[0.1, 0.8, 0.3], [0.7, 0.2, 0.1]], requires_grad=True)
    mask = RankMask.apply(r)
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1.0, 1e-4], [1.0, 1e-4, 1e-4]]))
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (mask * g).sum().backward()
    want = torch.tensor([[1e-4 * 1, 1 * 0.1 + 2 * 0.8, 1e-4 * 3], [4 * 0.7, 1e-4 * 5, 1e-4 * 6]])
    torch.testing.assert_close(r.grad, want)


def test_authors_gsv_linear_equals_a_loop_over_experts():
    """Linear.forward of their code: bias on the router logits, top-k of the softmax, each
    expert ``B (A * (E * rank_mask)) x * scaling`` weighted by its renormalised gate."""
    torch.manual_seed(0)
    plain = MolaLinear(torch.nn.Linear(12, 10), num_experts=4, r=3, lora_alpha=6, top_k=2)
    gsv = GSVLinear(plain, min_experts=2)
    with torch.no_grad():
        gsv.lora_B.normal_()
    x = torch.randn(5, 12)
    y = gsv(x)
    s_e = torch.sigmoid(gsv.lora_gsv_experts)
    n = max(int(s_e.argmax()), 1)
    bias = torch.tensor([0.5 if i <= n else -1e4 for i in range(4)])
    probs = torch.softmax(gsv.router(x) + bias, -1)
    rows = []
    for t in range(5):
        top = probs[t].topk(2)
        out = torch.zeros(10)
        for w, e in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
            s_r = torch.sigmoid(gsv.lora_gsv_ranks[e])
            m = int(s_r.argmax())
            mask = torch.tensor([1.0 if j <= m else 1e-4 for j in range(3)])
            a = gsv.lora_A[e] * (gsv.lora_rank_scale[e] * mask)[:, None]
            out = out + w * (gsv.lora_B[e] @ (a @ x[t])) * gsv.scaling
        rows.append(out)
    torch.testing.assert_close(y, gsv.base_layer(x) + torch.stack(rows), rtol=1e-5, atol=1e-6)
    y.pow(2).sum().backward()
    assert gsv.lora_gsv_experts.grad.count_nonzero() <= 1  # only the chosen entry moves
    assert gsv.lora_gsv_ranks.grad.abs().sum() > 0 and gsv.lora_rank_scale.grad is not None
    k, ranks = gsv.chosen()
    assert k == max(2, n + 1) and len(ranks) == 4


def test_paired_batches_count_epochs_in_pairs():
    batches = [{"i": i} for i in range(5)]
    train, held, steps = guilomo.paired_batches(batches, 2.0, seed=0)
    assert steps == 6  # 3 pairs per epoch (the last batch pairs with itself) x 2 epochs
    pairs = list(zip(train, held, strict=True))
    assert len(pairs) == 6
    first_epoch = {b["i"] for p in pairs[:3] for b in p}
    assert first_epoch == set(range(5))


def test_seed_agreement_says_when_no_shape_is_stable():
    same = seed_agreement([[2, 3, 4, 5], [2, 3, 4, 5]], [[1, 2, 2, 3], [1, 2, 2, 3]])
    assert same["layer_experts_r"] == 1.0 and same["stable"]
    assert "stable across seeds" in agreement_line(same)
    noise = seed_agreement([[2, 5, 3, 4], [5, 2, 4, 3]], [[1, 2, 3, 1], [3, 1, 2, 2]])
    assert noise["layer_experts_r"] < 0 and not noise["stable"]
    assert "no stable shape found" in agreement_line(noise)
    assert correlation([1, 1, 1], [1, 2, 3]) == 0.0


def test_cli_allocate_reports_seed_agreement(tiny_llama_dir, mc_file, tmp_path, capsys):
    out = tmp_path / "s.yaml"
    args = ["allocate", "--model", str(tiny_llama_dir), "--data", str(mc_file), *FAST]
    cut = args.index("--probe-steps")
    args = args[:cut] + args[cut + 2 :]  # the length in epochs instead
    code = main(
        [*args, "--budget", "5", "--seeds", "2", "--probe-epochs", "1", "--output", str(out)]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("2 seeds agree: per-layer r")
    alloc = read_allocation(out)
    assert alloc["scores"]["seed_agreement"]["seeds"] == 2
    modules = alloc["scores"]["gsv_modules"]
    assert len(modules) == 2 * 3 and all(len(m["ranks"]) == m["experts"] for m in modules.values())
    assert alloc["probe"]["epochs"] == 1.0 and alloc["probe"]["seeds"] == 2


def test_module_allocation_builds_each_modules_own_shape(tmp_path):
    name = "model.layers.3.self_attn.q_proj"  # a live layer (0-1 see zeros)
    shape = {name: {"num_experts": 3, "expert_ranks": [1, 4, 2]}}
    config = MolaConfig(num_experts=2, r=2, module_allocation=shape)
    base = _two_group_model()
    model = MolaModel(base, config)
    layers = dict(model.mola_layers())
    q = layers[name]
    assert (q.num_experts, q.r) == (3, 4)
    assert q.experts.lora_rank_mask.sum(dim=1).tolist() == [1.0, 4.0, 2.0]
    other = layers["model.layers.3.self_attn.v_proj"]
    assert (other.num_experts, other.r) == (2, 2) and other.experts.lora_rank_mask is None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.eval().save_pretrained(tmp_path)
    again = MolaModel.from_pretrained(_two_group_model(), tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        torch.testing.assert_close(got, again(input_ids=ids).logits)
        with model.disable_adapter():
            assert not torch.allclose(got, model(input_ids=ids).logits)  # the adapter acts
    with pytest.raises(ValueError, match="module_allocation"):
        MolaConfig(module_allocation={name: {"num_experts": 2, "expert_ranks": [1]}})


def test_cli_allocate_by_module_then_train(tiny_llama_dir, mc_file, tmp_path, capsys):
    out = tmp_path / "m.yaml"
    args = ["allocate", "--model", str(tiny_llama_dir), "--data", str(mc_file), *FAST]
    assert main([*args, "--budget", "5", "--granularity", "module", "--output", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--granularity module" in line and "6 modules as read off" in line
    alloc = read_allocation(out)
    assert len(alloc["modules"]) == 6
    run = tmp_path / "run"
    code = main(
        ["train", "--model", str(tiny_llama_dir), "--data", str(mc_file), "--allocation", str(out),
         "--target-modules", "q_proj,v_proj,down_proj", "--max-steps", "1", "--batch-size", "4",
         "--no-progress", "--no-eval", "--output", str(run), "--save-steps", "0"]
    )  # fmt: skip
    assert code == 0
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["module_allocation"] == alloc["modules"]
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = MolaModel.from_pretrained(base, run)
    for name, shape in alloc["modules"].items():
        layer = dict(loaded.mola_layers())[name]
        assert layer.num_experts == shape["num_experts"]
        assert layer.r == max(shape["expert_ranks"])
