"""Gradient accumulation for real: ``--batch-size 2 --grad-accum 2`` against ``--batch-size 4``.

The LM loss is normalised over the tokens of the whole optimizer step, so with no router loss
the two runs are the same run. Router losses are taken per micro-batch and averaged over the
accumulation steps (a balance loss is not additive over micro-batches), so with one they differ
a little, and the logged ``loss`` is still ``lm_loss + coef x aux_loss`` each step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mola.cli import main

ROWS = [  # different lengths, so micro-batches are padded differently from the full batch
    {"instruction": "Name a fruit" + " please" * (i % 5), "output": "apple banana" * (1 + i % 3)}
    for i in range(16)
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("accum") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def train(model: Path, data: Path, out: Path, batch: int, accum: int, aux: float) -> Path:
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(out)]
    args += ["--batch-size", str(batch), "--grad-accum", str(accum), "--max-steps", "5"]
    args += ["--experts", "2,3", "--dropout", "0", "--aux-loss-coef", str(aux), "--lr", "1e-2"]
    args += ["--logging-steps", "1", "--save-steps", "0", "--no-eval", "--no-progress"]
    assert main(args) == 0
    return out


def step_logs(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def adapter_gap(a: Path, b: Path) -> float:
    new = load_file(a / "adapter_model.safetensors")
    old = load_file(b / "adapter_model.safetensors")
    assert new.keys() == old.keys()
    gaps = [(new[k] - old[k]).norm() / old[k].norm().clamp_min(1e-12) for k in old]
    return float(torch.stack(gaps).max())


def test_accumulated_micro_batches_equal_one_batch_without_router_loss(
    tiny_llama_dir, data, tmp_path
):
    full = train(tiny_llama_dir, data, tmp_path / "full", 4, 1, 0.0)
    accum = train(tiny_llama_dir, data, tmp_path / "accum", 2, 2, 0.0)
    got, want = step_logs(accum), step_logs(full)
    assert len(got) == len(want) == 5
    for a, b in zip(got, want, strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5), (a, b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    assert adapter_gap(accum, full) < 1e-4


def test_accumulated_router_loss_is_logged_per_step_and_trains(tiny_llama_dir, data, tmp_path):
    full = train(tiny_llama_dir, data, tmp_path / "full", 4, 1, 0.1)
    accum = train(tiny_llama_dir, data, tmp_path / "accum", 2, 2, 0.1)
    got, want = step_logs(accum), step_logs(full)
    assert len(got) == len(want) == 5
    # step 1 starts from the same weights: the LM part is the same, the balance loss is the
    # mean of the two micro-batches' (close to, not equal to, the full batch's)
    assert got[0]["lm_loss"] == pytest.approx(want[0]["lm_loss"], rel=1e-5)
    for row in got:
        # aux_loss is logged before its coefficient: E_l sum_i f_i P_i summed over the 2 layers,
        # which is 1 per layer when balanced and at most E_l (here 2 + 3) when collapsed
        assert 2.0 - 1e-3 < row["aux_loss"] < 5.0
        assert row["loss"] == pytest.approx(row["lm_loss"] + 0.1 * row["aux_loss"], rel=1e-3)
    # per micro-batch balance losses move the adapter apart from the full batch's (Adam at lr 1e-2
    # amplifies small gradient differences; B starts at zero), but not far: < 0.15 after 5 steps
    assert 1e-3 < adapter_gap(accum, full) < 0.15
