"""Data-parallel training for real: 2 gloo processes on CPU against 1 process with the same global
batch, launched by ``torchrun`` (one host and two "hosts") and by ``accelerate launch``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mola.utils.distributed import check_launch

ROWS = [  # examples of different lengths, so batches are padded differently per process
    {"instruction": "Name a fruit" + " please" * (i % 5), "output": "apple banana" * (1 + i % 3)}
    for i in range(16)
]
TRAIN = [
    "--max-steps",
    "6",  # 16 examples / global batch 4: crosses into a second epoch
    "--experts",
    "2,3",
    "--dropout",
    "0",
    "--aux-loss-coef",
    "0.1",  # large enough that a per-process balance loss moves the adapter by > 1e-3
    "--logging-steps",
    "1",
    "--save-steps",
    "0",
    "--no-eval",
    "--no-progress",
]


def mola_script() -> str:
    """The installed ``mola`` console script (what ``$(which mola)`` gives in a venv)."""
    script = Path(sys.executable).with_name("mola")
    return str(script) if script.is_file() else "mola"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": src + (os.pathsep + path if path else ""),
    }


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_args(model: Path, data: Path, out: Path, batch: int) -> list[str]:
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(out)]
    return [*args, "--batch-size", str(batch), *TRAIN]


def step_logs(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = step_logs(out), step_logs(ref)
    assert len(got) == len(want) == 6
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "lm_loss", "aux_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
    new, old = (
        load_file(out / "adapter_model.safetensors"),
        load_file(ref / "adapter_model.safetensors"),
    )
    assert new.keys() == old.keys()
    for name in old:
        diff = (new[name] - old[name]).norm() / old[name].norm().clamp_min(1e-12)
        assert diff < 1e-3, (name, float(diff))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, data, tmp_path_factory) -> Path:
    """One process, batch 4: what 2 processes x batch 2 must reproduce."""
    out = tmp_path_factory.mktemp("ddp") / "one"
    run([mola_script(), *train_args(tiny_llama_dir, data, out, 4)])
    return out


def test_torchrun_two_processes_equal_one(tiny_llama_dir, data, reference, tmp_path):
    out = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    proc = run([*launch, mola_script(), *train_args(tiny_llama_dir, data, out, 2)])
    starts = [line for line in proc.stdout.splitlines() if line.startswith("mola: training")]
    assert starts == [
        "mola: training data-parallel on 2 processes (gloo, cpu, fp32); global batch 4 = 2 per "
        "device x 2 processes x 1 accumulation step"
    ], proc.stdout
    assert proc.stdout.count("adapter, metrics.json and logs in") == 1  # only rank 0 reports
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stderr
    assert_same_run(out, reference)


def test_accelerate_launch_two_processes_equal_one(tiny_llama_dir, data, reference, tmp_path):
    out = tmp_path / "acc"
    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "ddp_cpu.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--main_process_port", str(free_port())]  # the shipped example, 2 processes
    run([*launch, mola_script(), *train_args(tiny_llama_dir, data, out, 2)])
    assert_same_run(out, reference)


def test_two_nodes_on_one_host_equal_one(tiny_llama_dir, data, reference, tmp_path):
    """``torchrun --nnodes 2 --nproc-per-node 1``: two launchers rendezvous on 127.0.0.1."""
    out = tmp_path / "nodes"
    port = str(free_port())
    launchers = [
        subprocess.Popen(
            [
                *[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"],
                *["--nproc-per-node", "1", "--node-rank", str(node)],
                *["--master-addr", "127.0.0.1", "--master-port", port],
                mola_script(),
                *train_args(tiny_llama_dir, data, out, 2),
            ],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    results = [p.communicate(timeout=300) for p in launchers]
    for proc, (_, err) in zip(launchers, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert "data-parallel on 2 processes" in results[0][0]
    assert "mola: training" not in results[1][0]  # node 1 trains but does not report
    assert_same_run(out, reference)


def test_accelerate_cpu_flag_starting_one_process_is_refused(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # accelerate sets it for num_processes > 1
    with pytest.raises(ValueError, match="--multi_gpu"):
        check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real multi-process launch passes
    check_launch()


def test_global_balance_loss_without_process_group_is_the_local_one():
    from mola.routing import build_router, load_balancing_loss, router_z_loss

    torch.manual_seed(0)
    logits = [torch.randn(2, 5, 4, requires_grad=True) for _ in range(3)]
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    router = build_router("topk", 4, 2)
    for fn, extra in ((load_balancing_loss, (router,)), (router_z_loss, ())):
        local = fn(logits, *extra, mask)
        glob = fn(logits, *extra, mask, global_batch=True)
        assert torch.equal(local, glob)


def test_demo_under_torchrun_trains_data_parallel_and_reports_once(tiny_llama_dir, tmp_path):
    """``mola demo`` (train + eval before/after) under torchrun: rank 0 alone prints and writes."""
    rows = [
        {"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": "AB"[i % 2]}
        for i in range(8)
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "demo"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    demo = ["demo", "--model", str(tiny_llama_dir), "--data", str(data), "--eval-data", str(data)]
    demo += ["--output", str(out), "--experts", "2,3", "--rank", "4", "--max-steps", "2"]
    demo += ["--batch-size", "2", "--eval-batch-size", "8", "--logging-steps", "1", "--no-progress"]
    proc = run([*launch, mola_script(), *demo])
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("mola: training")] == [
        "mola: training data-parallel on 2 processes (gloo, cpu, fp32); global batch 4 = 2 per "
        "device x 2 processes x 1 accumulation step"
    ], lines
    banners = [line for line in lines if line.startswith("mola demo:")]
    assert len(banners) == 1 and "experts 2,3" in banners[0] and "r 4" in banners[0], lines
    assert sum(line.startswith("accuracy: ") for line in lines) == 1, lines
    assert proc.stdout.count("adapter, metrics.json and logs in") == 1, lines
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"zero_shot", "fine_tuned"} <= metrics.keys()
    assert len(step_logs(out)) == 2  # --logging-steps 1: one row per optimizer step
