"""ReMoE's adaptive L1 weight: the update's arithmetic, a run where it moves the ReLU routers'
sparsity towards ``1 - k/E``, and a resumed run that continues the weight exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mola.cli import main
from mola.routing.adaptive_l1 import AdaptiveL1, next_coef
from mola.routing.base import Routing

ROWS = [
    {"instruction": "Name a fruit" + " please" * (i % 4), "output": "apple banana" * (1 + i % 3)}
    for i in range(12)
]


def routing(mask: list[list[int]]) -> Routing:
    m = torch.tensor(mask, dtype=torch.bool)
    return Routing(m.float(), m.float(), m)


def test_next_coef_multiplies_below_target_and_divides_otherwise():
    assert next_coef(1e-8, 0.5, 0.75, 1.2) == 1e-8 * 1.2
    assert next_coef(1e-8, 0.8, 0.75, 1.2) == 1e-8 / 1.2
    assert next_coef(2.0, 0.75, 0.75, 1.2) == 2.0 / 1.2  # at the target: divided, as ReMoE's code
    assert next_coef(0.3, 0.1, 0.75, 1.0) == 0.3  # alpha 1: fixed


def test_counts_over_layers_microbatches_and_padding():
    schedule = AdaptiveL1(0.01, 1.5)
    pad = torch.tensor([[1, 1], [1, 0]])  # 2 examples x 2 tokens; the last token is padding
    # layer 0, E=4, k=1, two modules: kept rows have 1,2,4,0 | 1,1,3,x active experts
    a = routing([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    b = routing([[0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    schedule.observe(0, [a, b], 4, 1, pad.reshape(2, 2))
    # layer 1, E=2, k=1, no padding mask, observed in two micro-batches
    schedule.observe(1, [routing([[1, 0], [1, 1]])], 2, 1)
    schedule.observe(1, [routing([[0, 0], [0, 1]])], 2, 1)
    schedule.step()
    layer0 = 1 - (1 + 2 + 4 + 1 + 1 + 3) / (6 * 4)  # 6 kept rows of 4 gates
    layer1 = 1 - 4 / 8
    assert schedule.sparsity == pytest.approx((layer0 + layer1) / 2, abs=1e-12)
    assert schedule.target == pytest.approx(((1 - 1 / 4) + (1 - 1 / 2)) / 2, abs=1e-12)
    assert schedule.applied == 0.01
    assert schedule.coef == 0.01 * 1.5  # 0.5 < 0.625: too dense, weight up
    schedule.observe(1, [routing([[0, 0], [0, 0]])], 2, 1)  # all zero: sparser than the target
    schedule.step()
    assert schedule.sparsity == 1.0 and schedule.target == 0.5
    assert schedule.applied == 0.01 * 1.5 and schedule.coef == 0.01 * 1.5 / 1.5
    schedule.step()  # no forward in between: nothing measured, nothing changes
    assert schedule.coef == 0.01
    restored = AdaptiveL1(0.5, 1.5)
    restored.load_state(json.loads(json.dumps(schedule.state())))
    assert restored.state() == schedule.state()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("l1") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def train(model: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(out)]
    argv += ["--router", "relu", "--experts", "4", "--top-k", "1", "--batch-size", "4"]
    argv += ["--dropout", "0", "--logging-steps", "1", "--no-eval", "--no-progress", *extra]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def test_adaptive_weight_moves_sparsity_towards_the_target(tiny_llama_dir, data, tmp_path):
    common = ["--max-steps", "16", "--lr", "0.01", "--save-steps", "0"]
    free = train(
        tiny_llama_dir,
        data,
        tmp_path / "free",
        *common,
        "--l1-loss-coef",
        "0",
        "--l1-loss-alpha",
        "1",
    )
    ruled = train(
        tiny_llama_dir, data, tmp_path / "ruled", *common,
        *["--l1-loss-coef", "0.01", "--l1-loss-alpha", "1.5"],
    )  # fmt: skip
    target = 1 - 1 / 4
    assert all(row["l1_loss_coef"] == 0 for row in free)  # 0 stays 0; sparsity still logged
    assert ruled[0]["l1_loss_coef"] == 0.01
    for now, after in zip(ruled, ruled[1:], strict=False):  # the logged weights follow the rule
        want = next_coef(now["l1_loss_coef"], now["l1_sparsity"], target, 1.5)
        assert after["l1_loss_coef"] == pytest.approx(want, rel=1e-12)
    assert ruled[0]["l1_sparsity"] < target  # starts too dense: the weight grows
    assert ruled[-1]["l1_loss_coef"] > 0.01
    gap_free = abs(target - free[-1]["l1_sparsity"])
    gap_ruled = abs(target - ruled[-1]["l1_sparsity"])
    print(f"final sparsity: free {free[-1]['l1_sparsity']}, adaptive {ruled[-1]['l1_sparsity']}")
    print("adaptive weights:", [r["l1_loss_coef"] for r in ruled])
    print("adaptive sparsity:", [r["l1_sparsity"] for r in ruled])
    print("free sparsity:", [r["l1_sparsity"] for r in free])
    assert gap_ruled < gap_free - 0.05, (free[-1], ruled[-1])


def test_resume_continues_the_adaptive_weight(tiny_llama_dir, data, tmp_path):
    common = ["--max-steps", "6", "--save-steps", "3", "--lr", "0.01", "--l1-loss-coef", "0.05"]
    whole = tmp_path / "whole"
    want = train(tiny_llama_dir, data, whole, *common)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(whole / "checkpoint-3", part / "checkpoint-3")
    got = train(tiny_llama_dir, data, part, *common, "--resume")
    assert [r["step"] for r in got] == list(range(1, 7))
    assert len({r["l1_loss_coef"] for r in want}) > 1  # the weight really moved
    for a, b in zip(got[3:], want[3:], strict=True):
        for key in ("loss", "l1_loss", "l1_loss_coef", "l1_sparsity"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a, b)
    new, old = (
        load_file(part / "adapter_model.safetensors"),
        load_file(whole / "adapter_model.safetensors"),
    )
    for name in old:
        torch.testing.assert_close(new[name], old[name], rtol=1e-6, atol=1e-6)
