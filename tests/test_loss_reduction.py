"""Each preset's auxiliary losses aggregate over modules and layers as its authors' code does.

The references below are written from each authors' training code (the file is named in each),
on the routing the model recorded, so what is tested is the aggregation: which rows form one
loss, and how the losses add up over modules and layers. Values and gradients (with respect to
every router parameter) must match on a 4-layer model with padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import build

from mola import MolaConfig, get_mola_model
from mola.methods import apply_method
from mola.routing.dynmole import tsallis_entropy
from mola.routing.sparsegen import sparsity_bound
from mola.training.options import TrainOptions

B, T = 2, 6


def preset_model(method: str, **override):
    config = TrainOptions(**apply_method({"method": method, **override})).mola_config()
    base, _, _ = build("llama")
    model = get_mola_model(base, config)
    with torch.no_grad():  # spread the logits: a real mixture of selections
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.mul_(4.0)
    return model


def run(model, group=None):
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    with model.capture_router_logits() as store:
        out = model(input_ids=ids, attention_mask=mask, labels=ids, group=group)
    layers = {}
    for idx, items in sorted(store.records.items()):
        unique = list({id(r): r for _, r in items}.values())
        layers[idx] = unique
    return out, layers, mask.float()


def router_params(model):
    return [p for n, p in model.named_parameters() if "router" in n and p.requires_grad]


def check(model, got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    params = router_params(model)
    g1 = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
    g2 = torch.autograd.grad(want, params, retain_graph=True, allow_unused=True)
    assert any(a is not None and a.abs().sum() > 0 for a in g1)
    for a, b in zip(g1, g2, strict=True):
        if a is None or b is None:
            assert (a is None or a.abs().sum() == 0) and (b is None or b.abs().sum() == 0)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def rows(t):
    return t.reshape(-1, t.shape[-1])


def test_mola_is_one_loss_per_layer_summed_over_layers():
    """MoLA (GCYZSL/MoLA): per decoder layer on the stacked rows, summed; the core oracle."""
    model = preset_model("mola", experts="4")
    out, layers, m = run(model)
    total = 0.0
    for records in layers.values():
        z = torch.cat([rows(r.logits) for r in records]).float()
        keep = m.reshape(-1).repeat(len(records))
        p = torch.softmax(z, -1) * keep[:, None]
        sel = F.one_hot(z.topk(2, -1).indices, z.shape[-1]).sum(1).float() * keep[:, None]
        f = sel.sum(0) / sel.sum()
        total = total + z.shape[-1] * (f * p.sum(0) / keep.sum()).sum()
    check(model, out.aux_loss, total)


def test_ldmole_averages_per_module_losses_over_all_modules():
    """eshentw/LD-MoLE loss/loss.py: LoadBalancingLoss._forward per module, stack(...).mean();
    RegularizationLoss: per module mean of relu(lower - lambda), divided by the module count."""
    model = preset_model("ld-mole")
    out, layers, m = run(model)
    balance, sparsity = [], []
    for records in layers.values():
        for r in records:
            w = r.gates.reshape(B, T, -1) * m[..., None]
            count = torch.sign(w)
            freq = count.reshape(-1, w.shape[-1]).sum(0) / count.sum()
            prop = w.reshape(-1, w.shape[-1]).sum(0) / m.sum()
            balance.append(w.shape[-1] * (prop * freq).sum())
            term = F.relu(sparsity_bound(r.logits, 2) - r.extras["lambda"]) * m.reshape(-1)
            sparsity.append(term.sum() / m.sum())  # mola leaves padding out (docs/methods.md)
    assert len(balance) == 4 * 7
    check(model, out.aux_loss, torch.stack(balance).mean())
    check(model, out.sparsity_loss, torch.stack(sparsity).mean())


def test_dynmole_is_one_loss_over_all_layers_concatenated():
    """mikecovlee/DynMoLE moe_peft/adapters/dynmole/model.py: _dynamic_load_balancing_loss_func
    on the router logits of all layers concatenated (moe_utils.unpack_router_logits)."""
    model = preset_model("dynmole")
    out, layers, m = run(model)
    records = [r for rs in layers.values() for r in rs]
    orig = torch.cat([torch.softmax(rows(r.logits).float(), -1) for r in records])
    weights = torch.cat([rows(r.gates) for r in records])  # p * mask, not renormalised
    am = m.reshape(-1).repeat(len(records))[:, None]
    tokens = (weights * am).sum(0) / (am.sum(0) + 1e-8)
    probs = (orig * am).sum(0) / (am.sum(0) + 1e-8)
    check(model, out.aux_loss, orig.shape[-1] * (tokens * probs).sum())
    entropy = tsallis_entropy(orig, 1.1, 1e-5)
    check(model, out.entropy_loss, (entropy * am[:, 0]).sum() / am.sum())


def test_mixlora_is_mixtrals_loss_over_all_layers():
    """TUDB-Labs/MoE-PEFT moe_peft/adapters/mixlora/model.py: _mixtral_load_balancing_loss_func
    on every layer's block router logits concatenated (f_i per top-k slot)."""
    model = preset_model("mixlora")
    out, layers, m = run(model)
    records = [r for rs in layers.values() for r in rs]
    assert len(records) == 4  # one router per MLP block
    logits = torch.cat([rows(r.logits) for r in records]).float()
    e, k = logits.shape[-1], 2
    weights = torch.softmax(logits, -1)
    expert_mask = F.one_hot(weights.topk(k, -1).indices, e).float()  # (N, k, E)
    am = m[None, :, :, None, None].expand(4, B, T, k, e).reshape(-1, k, e)
    tokens = (expert_mask * am).sum(0) / am.sum(0)
    pm = m[None, :, :, None].expand(4, B, T, e).reshape(-1, e)
    prob = (weights * pm).sum(0) / pm.sum(0)
    check(model, out.aux_loss, (tokens * prob[None]).sum() * e)


def test_adamole_sums_per_module_losses():
    """zefang-liu/AdaMoLE src/adamole/layer.py get_layer_loss per module; model.get_aux_loss
    sums them."""
    model = preset_model("adamole")
    out, layers, m = run(model)
    total = 0.0
    keep = m.reshape(-1)[:, None]
    for records in layers.values():
        for r in records:
            shifted = r.extras["shifted"]
            selected = (shifted >= 0).float()
            fractions = (selected * keep).sum(0) / keep.sum()
            probs = (shifted * keep).sum(0) / keep.sum()
            total = total + shifted.shape[-1] * (fractions * probs).sum()
    check(model, out.aux_loss, total)


def test_loramoe_sums_cv_squared_over_modules_with_the_authors_groups():
    """Ablustrund/LoRAMoE peft/tuners/lora.py Linear.forward (cv_squared of I * Q per module,
    type 1 -> the first half of the experts) and modeling_llama.py (added up over modules)."""
    model = preset_model("loramoe")
    group = torch.tensor([0, 1])
    out, layers, m = run(model, group=group)
    total = 0.0
    for records in layers.values():
        assert len(records) == 3
        for r in records:
            e = r.gates.shape[-1]
            q = (r.gates.reshape(B, T, e) * m[..., None]).sum(1)
            types = group.view(-1, 1)
            first = (types == 1).repeat(1, e // 2)
            second = (types == 0).repeat(1, e // 2)
            coef = torch.where(torch.cat([first, second], -1), 1.1, 0.9)
            z = (q * coef).flatten().float()
            total = total + z.var() / (z.mean() ** 2 + 1e-10)
    check(model, out.lbc_loss, total)


@pytest.mark.parametrize("reduction", ["layer", "module_sum", "module_mean", "global"])
def test_reduction_key_overrides_the_router_default(reduction):
    base, _, _ = build("llama")
    config = MolaConfig(num_experts=4, router="ldmole", aux_loss_reduction=reduction)
    model = get_mola_model(base, config)
    out, layers, m = run(model)
    from mola.routing.losses import share_balance_loss

    mask = m.long()
    per_layer = [share_balance_loss([r.gates for r in rs], [r.gates for r in rs], mask,
                                    normalise=True) for rs in layers.values()]  # fmt: skip
    per_module = [
        share_balance_loss([r.gates], [r.gates], mask, normalise=True)
        for rs in layers.values()
        for r in rs
    ]
    everything = [r for rs in layers.values() for r in rs]
    gates = [r.gates for r in everything]
    want = {
        "layer": torch.stack(per_layer).sum(),
        "module_sum": torch.stack(per_module).sum(),
        "module_mean": torch.stack(per_module).mean(),
        "global": share_balance_loss(gates, gates, mask, normalise=True),
    }[reduction]
    check(model, out.aux_loss, want)


def test_mixtral_reduction_needs_a_fixed_top_k_router():
    with pytest.raises(ValueError, match="aux_loss_reduction: 'mixtral'"):
        MolaConfig(router="dynmole", aux_loss_reduction="mixtral")
    with pytest.raises(ValueError, match="aux_loss_reduction: unknown"):
        MolaConfig(aux_loss_reduction="per_token")
