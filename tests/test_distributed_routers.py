"""Every router's own losses under data parallelism: 2 gloo processes x batch 2 train exactly
like 1 process x batch 4 (per-step losses and final adapters). One model carries all five routers
(``module_patterns``), each loss weighted enough that a per-process loss would show."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import ROWS, free_port, mola_script, run, step_logs

ROUTERS = ["relu", "ldmole", "adamole", "dynmole", "loramoe"]
PATTERNS = {  # every router in one model, one per module kind, so one run covers them all
    "q_proj": {"router": "relu"},
    "k_proj": {"router": "ldmole"},
    "v_proj": {"router": "adamole", "top_k": None},
    "o_proj": {"router": "dynmole"},
    "gate_proj|up_proj|down_proj": {"router": "loramoe", "top_k": None},
}
LOSSES = ["aux_loss", "l1_loss", "l1_loss_coef", "l1_sparsity", "sparsity_loss"]
LOSSES += ["entropy_loss", "lbc_loss"]
STEPS = 4
TRAIN = ["--max-steps", str(STEPS), "--experts", "2,3", "--top-k", "1", "--dropout", "0"]
TRAIN += ["--lr", "0.01", "--module-patterns", json.dumps(PATTERNS)]
TRAIN += ["--logging-steps", "1", "--save-steps", "0", "--no-eval", "--no-progress"]
for name in ("aux", "l1", "sparsity", "entropy", "lbc"):  # weights that make each loss matter
    TRAIN += [f"--{name}-loss-coef", "0.5"]


def args(model: Path, data: Path, out: Path, batch: int) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out)] + [
        *["--batch-size", str(batch), *TRAIN]
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp-routers") / "train.jsonl"  # types for LoRAMoE
    path.write_text("".join(json.dumps({**r, "group": i % 2}) + "\n" for i, r in enumerate(ROWS)))
    return path


def test_every_router_loss_two_processes_equal_one(tiny_llama_dir, data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run([mola_script(), *args(tiny_llama_dir, data, one, 4)])
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    run([*launch, mola_script(), *args(tiny_llama_dir, data, two, 2)])
    got, want = step_logs(two), step_logs(one)
    assert len(got) == len(want) == STEPS
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "lm_loss", *LOSSES):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
    for key in LOSSES:  # each router's loss took part
        assert any(row[key] > 0 for row in want), key
    config = json.loads((one / "adapter_config.json").read_text())
    assert config["module_patterns"] == PATTERNS
    new = load_file(two / "adapter_model.safetensors")
    old = load_file(one / "adapter_model.safetensors")
    assert new.keys() == old.keys()
    for name in old:
        diff = (new[name] - old[name]).norm() / old[name].norm().clamp_min(1e-12)
        assert diff < 1e-4, (name, float(diff))


def test_router_losses_global_without_process_group_are_the_local_ones():
    from mola.routing import build_router
    from mola.routing.base import Routing

    torch.manual_seed(0)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    group = torch.tensor([0, 1])
    for name in ROUTERS:
        top_k = 1 if name in ("relu", "ldmole", "dynmole") else None
        router = build_router(name, 4, top_k, None, 8)
        x = torch.randn(10, 8)
        records = [router.gate(x @ router.fused_weight().T, x) for _ in range(2)]
        assert all(isinstance(r, Routing) for r in records)
        local = router.layer_losses(records, mask, {"group": group})
        glob = router.layer_losses(records, mask, {"group": group}, global_batch=True)
        assert local.keys() == glob.keys()
        for key in local:
            assert torch.equal(local[key], glob[key]), (name, key)
