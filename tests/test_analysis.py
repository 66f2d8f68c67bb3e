"""mola.analysis and mola.plots: known answers on hand-made routers and weights, then models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from models import build
from PIL import Image

from mola import MolaConfig, build_router, get_mola_model, load_balancing_loss
from mola.analysis.plots import (
    DPI,
    load_matrix,
    plot_compare_entropy,
    plot_compare_redundancy,
    plot_entropy,
    plot_expert_load,
    plot_redundancy,
    save_plots,
)
from mola.analysis.report import (
    RoutingCounts,
    RoutingStats,
    analyze,
    build_report,
    collect_routing,
    expert_load,
    expert_redundancy,
    expert_update_norms,
    format_summary,
    module_keys,
    pairwise_expert_distances,
    redundancy_stats,
    routing_entropy,
)

# ----------------------------------------------------------------------------- routing numbers


def one_hot_logits(experts: list[int], num_experts: int, strength: float = 60.0) -> torch.Tensor:
    logits = torch.zeros(len(experts), num_experts)
    logits[torch.arange(len(experts)), torch.tensor(experts)] = strength
    return logits


@pytest.mark.parametrize("router", ["switch", "topk"])
def test_router_sending_everything_to_expert_0(router):
    logits = one_hot_logits([0] * 10, 4)
    r = build_router(router, 4, top_k=1)
    torch.testing.assert_close(expert_load(logits, r), torch.tensor([1.0, 0, 0, 0]).double())
    assert routing_entropy(logits) < 1e-6
    counts = RoutingCounts.from_logits(logits, r)
    assert counts.rows == 10 and counts.normalised_entropy < 1e-6
    assert counts.dead_experts(0.01) == [1, 2, 3]
    torch.testing.assert_close(counts.mean_prob, torch.tensor([1.0, 0, 0, 0]).double())


def test_uniform_router_has_entropy_log_e_and_balance_one():
    logits = torch.zeros(6, 5)
    counts = RoutingCounts.from_logits(logits, build_router("soft", 5))
    assert counts.entropy == pytest.approx(math.log(5))
    assert counts.max_entropy == pytest.approx(math.log(5))
    assert counts.normalised_entropy == pytest.approx(1.0)
    torch.testing.assert_close(counts.load, torch.full((5,), 0.2).double())
    assert counts.balance_loss() == pytest.approx(1.0)
    assert counts.dead_experts() == []


def test_top2_shares_sum_to_one_and_count_each_slot():
    # each token picks experts 0 and 1 (logits 5, 4, 0): shares 1/2, 1/2, 0
    logits = torch.tensor([[5.0, 4.0, 0.0]] * 4)
    torch.testing.assert_close(
        expert_load(logits, build_router("topk", 3, top_k=2)), torch.tensor([0.5, 0.5, 0]).double()
    )


def test_padding_is_excluded():
    # batch of 2 sequences x 3 tokens; the padded tokens all go to expert 2
    logits = one_hot_logits([0, 1, 0, 0, 2, 2], 3).view(2, 3, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    router = build_router("topk", 3, top_k=1)
    torch.testing.assert_close(
        expert_load(logits, router, mask), torch.tensor([0.75, 0.25, 0]).double()
    )
    torch.testing.assert_close(
        expert_load(logits, router), torch.tensor([3 / 6, 1 / 6, 2 / 6]).double()
    )
    mixed = logits.clone()
    mixed[1, 1:] = 0.0  # uniform rows, but padding: must not add entropy
    assert routing_entropy(mixed, mask) < 1e-6
    assert routing_entropy(mixed) == pytest.approx(2 * math.log(3) / 6, rel=1e-5)
    counts = RoutingCounts.from_logits(mixed, router, mask)
    assert counts.rows == 4
    with pytest.raises(ValueError, match="attention_mask has 4 tokens"):
        RoutingCounts.from_logits(logits, router, torch.ones(2, 2))


def test_routing_stats_accumulate_exactly_over_batches():
    g = torch.Generator().manual_seed(0)
    routers = {0: build_router("topk", 2, top_k=1), 1: build_router("topk", 4, top_k=2)}
    shapes = [(2, 5), (3, 4)]  # (batch, length) of two batches
    batches, masks = [], []
    for b, t in shapes:
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, -2:] = 0
        logits = {
            layer: [(f"m{i}", torch.randn(b * t, e, generator=g)) for i in range(2)]
            for layer, e in ((0, 2), (1, 4))
        }
        batches.append(logits)
        masks.append(mask)
    stats = RoutingStats()
    for logits, mask in zip(batches, masks, strict=True):
        stats.update(logits, routers, mask)
    assert stats.batches == 2 and stats.tokens == sum(int(m.sum()) for m in masks)
    assert stats.layers() == [0, 1] and stats.module_keys(1) == ["m0", "m1"]
    flat_mask = torch.cat([m.reshape(-1) for m in masks])
    for layer in (0, 1):
        router = routers[layer]
        whole = [
            torch.cat([dict(batch[layer])[name] for batch in batches]) for name in ("m0", "m1")
        ]
        for name, logits in zip(("m0", "m1"), whole, strict=True):
            ref = RoutingCounts.from_logits(logits, router, flat_mask)
            got = stats.module(layer, name)
            torch.testing.assert_close(got.counts, ref.counts)
            torch.testing.assert_close(got.prob_sum, ref.prob_sum)
            assert got.entropy == pytest.approx(ref.entropy)
            assert got.rows == ref.rows
        pooled = load_balancing_loss(whole, router, flat_mask)
        assert stats.pooled_balance_loss(layer) == pytest.approx(float(pooled), rel=1e-6)
        per_batch = [
            float(load_balancing_loss([t for _, t in batch[layer]], router, mask))
            for batch, mask in zip(batches, masks, strict=True)
        ]
        weights = [int(m.sum()) for m in masks]
        expected = sum(v * w for v, w in zip(per_batch, weights, strict=True)) / sum(weights)
        assert stats.balance_loss(layer) == pytest.approx(expected, rel=1e-6)
        layer_counts = stats.layer(layer)
        assert layer_counts.rows == 2 * stats.tokens
        torch.testing.assert_close(layer_counts.load.sum(), torch.tensor(1.0).double())
    with pytest.raises(ValueError, match="no router"):
        stats.update({5: [("x", torch.zeros(1, 2))]}, routers)


# ----------------------------------------------------------------------------- redundancy


def naive_distances(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Every full d_out x d_in update, then every difference's Frobenius norm."""
    a, b = a.detach().double(), b.detach().double()
    full = [scaling * (b[e] @ a[e]) for e in range(a.shape[0])]
    num = len(full)
    return torch.tensor(
        [
            [float(torch.sqrt(((full[i] - full[j]) ** 2).sum())) for j in range(num)]
            for i in range(num)
        ],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("method", ["gram", "dense", "auto"])
def test_identical_experts_have_zero_redundancy(method):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 4, 30, generator=g).expand(3, -1, -1).contiguous()
    b = torch.randn(1, 20, 4, generator=g).expand(3, -1, -1).contiguous()
    dist = pairwise_expert_distances(a, b, 2.0, method=method)
    assert torch.equal(dist, torch.zeros(3, 3, dtype=torch.float64))
    assert expert_redundancy(a, b, 2.0, method=method) == 0.0
    assert expert_redundancy(a, torch.zeros_like(b), method=method) == 0.0  # fresh B = 0


@pytest.mark.parametrize("method", ["gram", "dense"])
def test_known_difference_gives_its_frobenius_norm(method):
    # dW_0 = 2 * 3 e0 e0^T, dW_1 = 2 * 4 e1 e1^T, dW_2 = 0: distances 10, 6, 8
    a = torch.zeros(3, 1, 5)
    b = torch.zeros(3, 4, 1)
    a[0, 0, 0], b[0, 0, 0] = 1.0, 3.0
    a[1, 0, 1], b[1, 1, 0] = 1.0, 4.0
    a[2, 0, 2] = 1.0
    dist = pairwise_expert_distances(a, b, scaling=2.0, method=method)
    expected = torch.tensor([[0.0, 10.0, 6.0], [10.0, 0.0, 8.0], [6.0, 8.0, 0.0]]).double()
    torch.testing.assert_close(dist, expected)
    assert expert_redundancy(a[:2], b[:2], 2.0, method=method) == pytest.approx(10.0)
    assert expert_redundancy(a, b, 2.0, method=method) == pytest.approx(8.0)
    torch.testing.assert_close(expert_update_norms(a, b, 2.0), torch.tensor([6.0, 8.0, 0]).double())


@pytest.mark.parametrize("shape", [(5, 3, 40, 24), (4, 8, 16, 12), (2, 1, 7, 9)])
def test_gram_trick_equals_naive_full_matrices(shape):
    num, r, d_in, d_out = shape
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(num, r, d_in, generator=g)
    b = torch.randn(num, d_out, r, generator=g)
    b[1] = b[0] + 1e-4 * torch.randn(d_out, r, generator=g)  # a nearly redundant pair
    a[1] = a[0]
    ref = naive_distances(a, b, 0.7)
    for method in ("gram", "dense", "auto"):
        got = pairwise_expert_distances(a, b, 0.7, method=method)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
        assert torch.equal(got, got.T)
    norms = torch.stack([0.7 * (b[e].double() @ a[e].double()).norm() for e in range(num)])
    torch.testing.assert_close(expert_update_norms(a, b, 0.7), norms)


def test_redundancy_input_checks():
    a, b = torch.zeros(2, 3, 4), torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="method"):
        pairwise_expert_distances(a, b, method="fast")
    with pytest.raises(ValueError, match="do not fit"):
        pairwise_expert_distances(a, torch.zeros(3, 5, 3))
    assert math.isnan(expert_redundancy(a[:1], b[:1]))


# ----------------------------------------------------------------------------- whole models


def randomise_b(model, seed=3, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def batches(num=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        ids = torch.randint(3, 97, (2, 6 + i), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def llama_report():
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=[2, 4], top_k=1, r=4, lora_dropout=0.0))
    randomise_b(model)
    data = batches()
    return model, data, analyze(model, data)


def test_fresh_adapter_redundancy_is_zero():
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=[2, 4], top_k=1))
    report = analyze(model)
    assert report["has_routing"] is False and report["tokens"] is None
    for item in report["layers"]:
        assert item["redundancy"] == 0.0 and item["load"] is None
        assert all(m["redundancy"] == 0.0 for m in item["modules"].values())
    assert "entropy/logE" not in format_summary(report)


def test_analyze_report_numbers(llama_report):
    model, data, report = llama_report
    json.dumps(report, allow_nan=False)  # JSON-ready
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    assert report["tokens"] == tokens and report["batches"] == 2
    assert report["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] + [
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert [item["num_experts"] for item in report["layers"]] == [2, 2, 4, 4]
    assert model.router_store.logits == {}
    assert model.training and not model.base_model.training  # each module's mode restored
    layers = dict(model.mola_layers())
    for item in report["layers"]:
        e = item["num_experts"]
        assert len(item["load"]) == e and sum(item["load"]) == pytest.approx(1.0, abs=1e-5)
        assert item["tokens"] == 7 * tokens and item["max_entropy"] == pytest.approx(math.log(e))
        assert 0.0 <= item["normalised_entropy"] <= 1.0
        assert item["balance_loss"] > 0 and item["balance_loss_pooled"] > 0
        for key, mod in item["modules"].items():
            layer = layers[mod["name"]]
            assert layer.layer_idx == item["layer"] and mod["name"].endswith(key)
            assert mod["tokens"] == tokens and len(mod["load"]) == e
            ref = expert_redundancy(layer.lora_A, layer.lora_B, layer.scaling, method="dense")
            assert mod["redundancy"] == pytest.approx(ref, rel=1e-5)
            assert np.allclose(
                mod["distances"],
                naive_distances(layer.lora_A, layer.lora_B, layer.scaling),
                rtol=1e-5,
            )
        means = [m["redundancy"] for m in item["modules"].values()]
        assert item["redundancy"] == pytest.approx(sum(means) / len(means), rel=1e-5)


def test_api_tensors_match_a_direct_forward(llama_report):
    model, data, report = llama_report
    stats = collect_routing(model, data[:1])
    with torch.no_grad(), model.capture_router_logits() as store:
        model(**data[0])
        mask = data[0]["attention_mask"]
        for layer in range(4):
            router = build_router("topk", [2, 2, 4, 4][layer], top_k=1)
            expected = load_balancing_loss(store.layer_logits(layer), router, mask)
            assert stats.balance_loss(layer) == pytest.approx(float(expected), rel=1e-6)
            name, logits = store.logits[layer][0]
            torch.testing.assert_close(
                stats.module(layer, "q_proj").load, expert_load(logits, router, mask)
            )
    keyed = redundancy_stats(model)
    assert set(keyed) == {(i, k) for i in range(4) for k in report["modules"]}
    assert keyed[(3, "down_proj")].distances.shape == (4, 4)


def test_module_keys_disambiguate_gpt2_c_proj_and_single_expert_layers():
    base, targets, _ = build("gpt2")
    model = get_mola_model(base, MolaConfig(target_modules=targets, num_experts=[1, 3], top_k=1))
    randomise_b(model)
    keys = set(module_keys(model).values())
    assert keys == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}
    report = analyze(model, batches(1))
    first, last = report["layers"][0], report["layers"][-1]
    assert first["num_experts"] == 1 and first["redundancy"] is None
    # a single expert is a plain LoRA: no router, so no routing statistics
    assert first["normalised_entropy"] is None and first["load"] is None
    assert last["redundancy"] > 0
    json.dumps(report, allow_nan=False)


def test_soft_router_load_is_uniform_but_mean_prob_is_not():
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=3, router="soft", top_k=None))
    with torch.no_grad():
        for _, layer in model.mola_layers():
            layer.router.weight.mul_(20.0)
    report = analyze(model, batches(1))
    item = report["layers"][0]
    assert item["load"] == pytest.approx([1 / 3] * 3, abs=1e-5)
    assert sum(item["mean_prob"]) == pytest.approx(1.0, abs=1e-5)
    assert max(item["mean_prob"]) - min(item["mean_prob"]) > 1e-3


def test_progress_bar_and_bad_threshold(llama_report, capsys):
    model, data, _ = llama_report
    collect_routing(model, data, progress=True)
    assert "analyze" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dead_threshold"):
        analyze(model, dead_threshold=1.5)
    with pytest.raises(ValueError, match="dead_threshold"):
        build_report(model, dead_threshold=-0.1)


def test_summary_table(llama_report):
    _, _, report = llama_report
    text = format_summary(report)
    lines = text.splitlines()
    assert "entropy/logE" in lines[1] and "redundancy" in lines[1]
    assert any(line.startswith("3 ") for line in lines)
    assert "down_proj" in text and "Routing entropy / log(E) by module" in text


# ----------------------------------------------------------------------------- plots


def png_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_load_heatmap_content(llama_report, tmp_path):
    _, _, report = llama_report
    path = tmp_path / "load.png"
    fig = plot_expert_load({**report, "label": "tri"}, path)
    ax = fig.axes[0]
    assert ax.get_title().startswith("Expert load by layer — tri")
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "decoder layer"
    shown = ax.images[0].get_array()
    assert shown.shape == (4, 4)
    assert shown.mask[:2, 2:].all() and not shown.mask[2:].any()  # blank past 2 experts
    np.testing.assert_allclose(shown.data[3], np.array(report["layers"][3]["load"]) * 4, rtol=1e-5)
    np.testing.assert_allclose(shown.data[0, :2], np.array(report["layers"][0]["load"]) * 2)
    np.testing.assert_allclose(np.nansum(load_matrix(report), axis=1), 1.0, atol=1e-4)
    assert len(ax.texts) == 2 * 2 + 2 * 4  # one annotation per real cell
    pixels = png_pixels(path)
    width, height = fig.get_size_inches() * DPI
    assert pixels.shape == (round(height), round(width), 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # not a blank image
    with pytest.raises(ValueError, match="routing statistics"):
        plot_expert_load({**report, "has_routing": False})


def test_redundancy_and_entropy_plot_content(llama_report, tmp_path):
    _, _, report = llama_report
    fig = plot_redundancy(report)
    ax = fig.axes[0]
    assert "redundancy" in ax.get_title().lower() and ax.get_xlabel() == "decoder layer"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == set(report["modules"]) | {"layer mean"}
    np.testing.assert_allclose(
        lines["v_proj"].get_ydata(),
        [i["modules"]["v_proj"]["redundancy"] for i in report["layers"]],
    )
    np.testing.assert_allclose(
        lines["layer mean"].get_ydata(), [i["redundancy"] for i in report["layers"]]
    )
    fig = plot_entropy(report)
    ax = fig.axes[0]
    assert "entropy" in ax.get_title().lower() and "log(E)" in ax.get_ylabel()
    means = [line for line in ax.get_lines() if line.get_label() == "layer mean"][0]
    np.testing.assert_allclose(
        means.get_ydata(), [i["normalised_entropy"] for i in report["layers"]]
    )
    assert all(0 <= y <= 1 for line in ax.get_lines() for y in line.get_ydata())
    written = save_plots(report, tmp_path / "figs")
    assert [p.rsplit("/", 1)[-1] for p in written] == [
        "expert_load.png",
        "redundancy.png",
        "entropy.png",
    ]
    for path in written:
        assert png_pixels(path).std() > 1.0
    assert len(save_plots({**report, "has_routing": False}, tmp_path / "w")) == 1


def test_compare_plots_overlay_one_curve_per_run(llama_report):
    _, _, report = llama_report
    weights_only = {**report, "has_routing": False}
    runs = [("tri", report), ("square", weights_only), ("other", report)]
    ax = plot_compare_redundancy(runs).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["tri", "square", "other"]
    np.testing.assert_allclose(
        ax.get_lines()[1].get_ydata(), [i["redundancy"] for i in report["layers"]]
    )
    ax = plot_compare_entropy(runs).axes[0]
    labelled = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labelled == ["tri", "other"]
    with pytest.raises(ValueError, match="routing statistics"):
        plot_compare_entropy([("square", weights_only)])
