"""Input groups (mola.inference.fused): modules that read the same input run as one at inference,
found from the model's dataflow, and equal to the per-module path on every family, router and
structure; anything inexact (training, gradients, analysis, other dtypes) falls back."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, build
from test_structures import CONFIGS as STRUCTURES
from torch import nn

from mola import MolaConfig, MolaLinear, get_mola_model
from mola.analysis.collect import collect_routing
from mola.inference.fused import InputGroup, find_input_groups, group_inputs, ungroup_inputs
from mola.routing import ROUTERS

# families whose decoder blocks read one input with several adapted modules (q/k/v, gate/up)
SPLIT_PROJECTIONS = {"llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3"}
GROUPED_STRUCTURES = {"stacked", "shared_a", "mosld"}  # routers reading x, no selection bias


def adapted(family="llama", seed=0, **config):
    base, targets, _ = build(family, seed)
    config = {"num_experts": 3, "r": 4, "top_k": 2, **config}
    model = get_mola_model(base, MolaConfig(target_modules=targets, **config)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def groups_of(model):
    found = {}
    for module in model.modules():
        if isinstance(module, MolaLinear) and module.input_group is not None:
            found[id(module.input_group)] = module.input_group
    return list(found.values())


def calls(model):
    return sum(g.calls for g in groups_of(model))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_groups_come_from_the_dataflow_and_equal_the_per_module_path(family):
    model = adapted(family)
    ref = logits(model, IDS)
    names = group_inputs(model)
    short = sorted(sorted(n.rsplit(".", 1)[-1] for n in group) for group in names)
    if family in SPLIT_PROJECTIONS:
        per_layer = [["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"]]
        assert short == sorted(per_layer * 4)
    else:  # Phi-3's qkv_proj/gate_up_proj and GPT-2's c_attn are fused already
        assert names == []
    out = logits(model, IDS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls(model) == len(names)  # every group ran once as a group in that forward


CASES = {f"router-{name}": {"router": name, "top_p": 0.75} for name in ROUTERS}
CASES.update({f"structure-{name}": config for name, config in STRUCTURES.items()})
CASES["plain-lora"] = {"num_experts": 1, "top_k": 1}
CASES["mixed-counts"] = {"num_experts": [1, 2, 3, 4], "top_k": 1}
CASES["ranks-by-module"] = {"module_patterns": {"k_proj": {"r": 2}}}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_router_and_structure_equals_the_per_module_path(case, family):
    model = adapted(family, **CASES[case])
    ref = logits(model, IDS)
    group_inputs(model)
    torch.testing.assert_close(logits(model, IDS), ref, rtol=1e-5, atol=1e-5)
    structure = CASES[case].get("experts_structure", "stacked")
    grouped = structure in GROUPED_STRUCTURES or not case.startswith("structure")
    if case == "structure-mosld":
        grouped = True  # shared A; the entry dropout acts in training only
    assert (calls(model) > 0) == grouped


def test_inference_mode_tensors_are_grouped_too():
    model = adapted("llama")
    ref = logits(model, IDS)
    names = group_inputs(model)
    with torch.inference_mode():
        out = model(input_ids=IDS).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls(model) == len(names)


def test_greedy_generation_with_kv_cache_and_left_padding_is_unchanged():
    model = adapted("llama")
    base = model.base_model
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = base.generate(ids, **kwargs)
        group_inputs(model)
        out = base.generate(ids, **kwargs)
    assert torch.equal(out, ref)
    assert calls(model) >= 6 * 8  # every step (prefill and one token) ran the 8 groups


def test_training_gradients_and_analysis_take_the_per_module_path():
    model = adapted("llama")
    group_inputs(model)
    ref = logits(model, IDS)
    before = calls(model)
    with torch.enable_grad():  # gradients on: the graph path, gradients reach the adapter
        out = model(input_ids=IDS).logits
        out.square().mean().backward()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    assert calls(model) == before
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    model.train()
    logits(model, IDS)  # training mode, even without gradients
    assert calls(model) == before
    model.eval()
    batch = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]
    stats = collect_routing(model, batch)
    assert calls(model) == before  # the analysis records every module's routing itself
    ungroup_inputs(model)
    again = collect_routing(model, batch)
    for layer in again.layers():
        for key in again.module_keys(layer):
            assert stats.module(layer, key).to_dict() == again.module(layer, key).to_dict()


def test_changed_adapter_weights_rebuild_the_group():
    model = adapted("llama")
    group_inputs(model)
    logits(model, IDS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and "k_proj" in name:
                p.mul_(-2.0)
    grouped = logits(model, IDS)
    ungroup_inputs(model)
    torch.testing.assert_close(grouped, logits(model, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_on_a_half_precision_base_cast_in_and_out_as_each_module(dtype):
    torch.manual_seed(0)
    pair = nn.ModuleDict(
        {n: MolaLinear(nn.Linear(8, 6 + len(n)).to(dtype), 3, r=2, top_k=2) for n in ("a", "bb")}
    ).eval()
    for m in pair.values():
        assert m.lora_A.dtype == torch.float32  # adapters stay fp32 on a half-precision base
        nn.init.normal_(m.lora_B)
    x = torch.randn(3, 8, dtype=dtype)
    with torch.no_grad():
        want = [pair["a"](x), pair["bb"](x)]
        group = InputGroup(pair.values())
        for m in pair.values():
            m.input_group = group
        got = [pair["a"](x), pair["bb"](x)]
    assert group.calls == 1
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_a_quantized_or_other_base_is_not_stacked_and_falls_back():
    class Frozen(nn.Linear):  # any subclass (bitsandbytes' Linear4bit is one): not stacked
        pass

    torch.manual_seed(0)
    pair = nn.ModuleDict({n: MolaLinear(Frozen(8, 6), 3, r=2, top_k=2) for n in "ab"}).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = [pair["a"](x), pair["b"](x)]
        group = InputGroup(pair.values())
        for m in pair.values():
            m.input_group = group
        got = [pair["a"](x), pair["b"](x)]
    assert group.base_weight is None and group.calls == 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class Block(nn.Module):
    """Names that would mislead a name-based rule: what reads what decides."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.alpha = MolaLinear(nn.Linear(8, 6), 3, r=2, top_k=2)
        self.beta = MolaLinear(nn.Linear(8, 5), 2, r=2, top_k=1)
        self.q_proj = MolaLinear(nn.Linear(8, 4), 3, r=2, top_k=2)  # reads its own input
        self.k_proj = MolaLinear(nn.Linear(6, 4), 3, r=2, top_k=2)  # reads alpha's output
        for m in (self.alpha, self.beta, self.q_proj, self.k_proj):
            nn.init.normal_(m.lora_B)

    def forward(self, x):
        a = self.alpha(x)
        return a.sum() + self.beta(x).sum() + self.q_proj(x * 2).sum() + self.k_proj(a).sum()


def test_groups_are_found_by_what_reads_the_same_tensor_not_by_name():
    block = Block().eval()
    x = torch.randn(3, 8)
    groups = find_input_groups(block, {"x": x})
    assert [[name for name, _ in g] for g in groups] == [["alpha", "beta"]]
    ref = block(x)
    group_inputs(block, {"x": x})
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref.detach(), rtol=1e-5, atol=1e-5)
    assert block.alpha.input_group is block.beta.input_group is not None
    assert block.q_proj.input_group is None and block.k_proj.input_group is None


def test_base_weights_become_views_without_a_copy_and_ungroup_restores_them():
    model = adapted("llama")
    layer = model.base_model.model.layers[1]
    q, k, v = (
        getattr(layer.self_attn, n).base_layer.weight for n in ("q_proj", "k_proj", "v_proj")
    )
    values = [t.clone() for t in (q, k, v)]
    group_inputs(model)
    group = layer.self_attn.q_proj.input_group
    assert isinstance(group, InputGroup)
    stacked = group.base_weight
    now = [getattr(layer.self_attn, n).base_layer.weight for n in ("q_proj", "k_proj", "v_proj")]
    assert now[0].data_ptr() == stacked.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(now, values, strict=True))
    ungroup_inputs(model)
    after = [getattr(layer.self_attn, n).base_layer.weight for n in ("q_proj", "k_proj", "v_proj")]
    assert all(t.data_ptr() != stacked.data_ptr() for t in after)
    assert all(torch.equal(a, b) for a, b in zip(after, values, strict=True))
    assert all(getattr(layer.self_attn, n).input_group is None for n in ("q_proj", "k_proj"))


@pytest.mark.parametrize("change", ["replace-bias", "add-bias", "drop-bias"])
def test_a_bias_changed_outright_is_seen_and_the_group_steps_aside(change):
    """Biased bases are stacked too; replacing a member's bias Parameter outright (not in place)
    leaves the stacked copy stale, so the group must decline and the module answer alone."""
    torch.manual_seed(0)
    members = [MolaLinear(nn.Linear(6, n, bias=n != 4), 3, r=2, top_k=2).eval() for n in (5, 4, 7)]
    for m in members:
        with torch.no_grad():
            m.experts.lora_B.normal_()
    group = InputGroup(members)
    for m in members:
        m.input_group = group
    x = torch.randn(3, 6)
    with torch.no_grad():
        _ = [m(x) for m in members]
    assert group.calls == 1  # grouped while the bases are in place
    target = members[1] if change == "add-bias" else members[0]
    if change == "drop-bias":
        target.base_layer.bias = None
    else:
        new = torch.randn(target.out_features)
        target.base_layer.bias = nn.Parameter(new, requires_grad=False)
    with torch.no_grad():
        got = [m(x) for m in members]
    assert group.calls == 1  # declined: every module took its own path
    for m, out in zip(members, got, strict=True):
        m.input_group = None
        with torch.no_grad():
            assert torch.allclose(out, m(x), atol=1e-6)


def test_a_group_needs_two_modules_of_one_width():
    with pytest.raises(ValueError, match="at least two"):
        InputGroup([MolaLinear(nn.Linear(4, 4), 2, r=2)])
    with pytest.raises(ValueError, match="different widths"):
        InputGroup([MolaLinear(nn.Linear(4, 4), 2, r=2), MolaLinear(nn.Linear(5, 4), 2, r=2)])


@pytest.mark.parametrize("tokens", [1, 40], ids=["block-diagonal", "per-member"])
@pytest.mark.parametrize("config", [{}, {"num_experts": [1, 2, 3, 4], "top_k": 1}])
def test_both_ways_of_adding_the_updates_equal_the_per_module_path(tokens, config):
    from mola.inference.fused import BLOCK_DIAGONAL_ROWS

    assert 1 <= BLOCK_DIAGONAL_ROWS < 40  # one test per way
    model = adapted("llama", **config)
    ids = torch.randint(0, 97, (1, tokens), generator=torch.Generator().manual_seed(4))
    ref = logits(model, ids)
    names = group_inputs(model)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    assert calls(model) == len(names)


def test_the_command_line_groups_only_when_asked_and_never_with_compile():
    from argparse import Namespace

    from mola.inference.fused import group_for_cli

    for args, grouped in [
        (Namespace(group_inputs=False, compile=None), False),
        (Namespace(group_inputs=True, compile="inductor"), False),
        (Namespace(group_inputs=True, compile=None), True),
    ]:
        model = adapted("llama")
        group_for_cli(model, args)
        assert bool(groups_of(model)) == grouped
