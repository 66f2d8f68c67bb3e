"""mola analyze's active experts per token: the counts the layers used, mean and histogram."""

from __future__ import annotations

import pytest
import torch
from models import build
from PIL import Image

from mola import MolaConfig, get_mola_model
from mola.analysis.plots import ACTIVE_PNG, is_dynamic, plot_active_experts, save_plots
from mola.analysis.report import analyze


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in (6, 9):
        ids = torch.randint(3, 97, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def adapted(router, **kw):
    base, _, _ = build("llama")
    model = get_mola_model(base, MolaConfig(num_experts=[3, 6], r=4, router=router, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name and p.dim() == 2:
                p.mul_(6.0)  # a peaked router: counts differ from token to token
    return model


@pytest.mark.parametrize("router", ["ldmole", "adamole", "dynmole", "relu"])
def test_active_experts_equal_the_layers_own_selection(router, tmp_path):
    model = adapted(router, top_k=2, top_p=0.75)
    data = batches()
    report = analyze(model, data)
    # direct count from a forward that records what each module used
    totals: dict[int, list[float]] = {}
    for batch in data:
        with torch.no_grad(), model.capture_router_logits() as store:
            model(**batch)
        keep = batch["attention_mask"].reshape(-1).bool()
        for layer, entries in store.records.items():
            for _, routing in entries:
                active = routing.mask.sum(-1)[keep].double()
                slot = totals.setdefault(layer, [0.0, 0.0])
                slot[0] += float(active.sum())
                slot[1] += float(active.numel())
    for item in report["layers"]:
        expected = totals[item["layer"]][0] / totals[item["layer"]][1]
        assert item["active_experts"] == pytest.approx(expected, rel=1e-9)
        assert sum(item["active_hist"]) == totals[item["layer"]][1]
        assert len(item["active_hist"]) == item["num_experts"] + 1 and item["dynamic"]
    assert is_dynamic(report)
    written = save_plots(report, tmp_path)
    assert str(tmp_path / ACTIVE_PNG) in written
    assert Image.open(tmp_path / ACTIVE_PNG).size[0] > 300


def test_fixed_top_k_has_exactly_k_active_and_no_histogram_plot(tmp_path):
    model = adapted("topk", top_k=2)
    report = analyze(model, batches())
    for item in report["layers"]:
        assert item["active_experts"] == 2.0 and not item["dynamic"]
        hist = item["active_hist"]
        assert hist[2] == sum(hist)
    assert not is_dynamic(report)
    assert str(tmp_path / ACTIVE_PNG) not in save_plots(report, tmp_path)
    plot_active_experts(report)  # still drawable on request
