"""Every router's own losses under data parallelism: 2 gloo processes x batch 2 train exactly
like 1 process x batch 4 (per-step losses and final adapters), each loss weighted enough that a
per-process loss would move the adapter visibly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import ROWS, free_port, run, step_logs

ROUTERS = {  # router: its flags; each loss weight large enough to matter
    "relu": ["--top-k", "1", "--l1-loss-coef", "0.5"],
    "ldmole": ["--top-k", "1", "--sparsity-loss-coef", "0.5", "--aux-loss-coef", "0.5"],
    "adamole": ["--aux-loss-coef", "0.5"],
    "dynmole": ["--top-k", "1", "--entropy-loss-coef", "0.5", "--aux-loss-coef", "0.5"],
    "loramoe": ["--lbc-loss-coef", "0.5", "--aux-loss-coef", "0"],
}
LOGGED = {
    "relu": ["l1_loss_coef", "l1_sparsity", "l1_loss"],
    "ldmole": ["aux_loss", "sparsity_loss"],
    "adamole": ["aux_loss"],
    "dynmole": ["aux_loss", "entropy_loss"],
    "loramoe": ["lbc_loss"],
}
STEPS = 4
COMMON = ["--max-steps", str(STEPS), "--experts", "2,3", "--dropout", "0", "--lr", "0.01"]
COMMON += ["--logging-steps", "1", "--save-steps", "0", "--no-eval", "--no-progress"]


def runs_file(root: Path, model: Path, data: Path, batch: int) -> Path:
    runs = [
        [
            *["--model", str(model), "--data", str(data), "--output", str(root / name)],
            *["--batch-size", str(batch), "--router", name, *flags, *COMMON],
        ]
        for name, flags in ROUTERS.items()
    ]
    path = root / "runs.json"
    path.write_text(json.dumps(runs))
    return path


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp-routers")
    data = root / "train.jsonl"  # a type per example, for LoRAMoE's constraint
    data.write_text("".join(json.dumps({**r, "group": i % 2}) + "\n" for i, r in enumerate(ROWS)))
    script = str(Path(__file__).with_name("train_many.py"))
    one, two = root / "one", root / "two"
    one.mkdir()
    two.mkdir()
    run([sys.executable, script, str(runs_file(one, tiny_llama_dir, data, 4))], timeout=600)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    run([*launch, script, str(runs_file(two, tiny_llama_dir, data, 2))], timeout=600)
    return one, two


@pytest.mark.parametrize("router", list(ROUTERS))
def test_router_losses_two_processes_equal_one(trained, router):
    one, two = trained[0] / router, trained[1] / router
    got, want = step_logs(two), step_logs(one)
    assert len(got) == len(want) == STEPS
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "lm_loss", *LOGGED[router]):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
    assert any(row[LOGGED[router][-1]] > 0 for row in want)  # the router's loss took part
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
