"""``benchmarks/gpu_check.py --device cpu --tiny``: the GPU self-check runs anywhere (CI runs it)
and writes its JSON and table where ``--output`` says."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mola.experts.registry import STRUCTURES
from mola.routing import ROUTERS

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("# mola GPU self-check")
    layers = {(r["kind"], r["name"]): r for r in result["layers"]}
    assert {n for k, n in layers if k == "router"} == set(ROUTERS)
    assert {n for k, n in layers if k == "structure"} == set(STRUCTURES)
    for row in layers.values():
        assert row["ok"] and row["adapter_dtype"] == "float32" and row["out_dtype"] == "bfloat16"
        assert 0 < row["rel_diff"] < 0.03  # a bf16 base really differs, within tolerance
    adapters = {r["adapter"] for r in result["train"]}
    assert {"mola default", "mola E=8"} <= adapters
    for row in result["train"]:
        assert row["loss_finite"] and row["tokens_per_s"] > 0 and row["trainable_params"] > 0
        assert row["peak_memory_gb"] is None  # not measured on the CPU
    decoded = {r["model"]: r for r in result["decode"]}
    assert {"base model", "mola default", "mola E=8"} <= set(decoded)
    assert all(r["new_tokens"] == 8 and math.isfinite(r["ms_per_token"]) for r in decoded.values())
    for name in ("mola default", "base model", "topk", "rankwise"):
        assert name in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_gpu_check_refuses_a_missing_gpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: error: --device: cuda requested but CUDA is not available here"
    ]
    assert not (tmp_path / "gpu_check.json").exists()
