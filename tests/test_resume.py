"""Kill and resume for real: SIGKILL right after a checkpoint, then ``--resume`` equals an
uninterrupted run (adapter, per-step logged losses), and half-written checkpoints are never used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mola.cli import main
from mola.training.trainer import PARTIAL_DIR, last_checkpoint

ROWS = [
    {"instruction": "Name a fruit" + " please" * (i % 4), "output": "apple banana" * (1 + i % 3)}
    for i in range(12)
]


def args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        *["train", "--model", str(model), "--data", str(data), "--output", str(out)],
        *["--max-steps", "8", "--batch-size", "4", "--save-steps", "2", "--logging-steps", "1"],
        # dropout on: the RNG state must be restored too; 3 steps per epoch: epochs change
        *["--experts", "2,3", "--dropout", "0.1", "--no-eval", "--no-progress"],
    ]


def step_logs(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(tiny_llama_dir, data, tmp_path):
    whole = tmp_path / "whole"
    assert main(args(tiny_llama_dir, data, whole)) == 0

    out = tmp_path / "killed"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src}
    cmd = [sys.executable, "-m", "mola.cli", *args(tiny_llama_dir, data, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-2").is_dir():  # appears whole: written elsewhere, renamed
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint-2"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()  # it really died mid-run
    resumed_from = last_checkpoint(str(out))
    assert resumed_from is not None

    # a checkpoint half-written when the kill came is in .partial/, never picked
    partial = out / PARTIAL_DIR / "checkpoint-7"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"truncated")
    assert last_checkpoint(str(out)) == resumed_from

    assert main([*args(tiny_llama_dir, data, out), "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == resumed_from
    assert not (out / PARTIAL_DIR).exists()

    got, want = step_logs(out), step_logs(whole)
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "learning_rate"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a, b)
    new = load_file(out / "adapter_model.safetensors")
    old = load_file(whole / "adapter_model.safetensors")
    for name in old:
        torch.testing.assert_close(new[name], old[name], rtol=1e-6, atol=1e-6)
