"""A non-finite loss stops training with one ``mola: error:`` line and exit status 2."""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load_file

from mola.cli import main

ROWS = [{"instruction": "Name a fruit" + " please" * (i % 3), "output": "apple"} for i in range(8)]


def test_lr_1e6_stops_with_one_line_naming_step_and_last_good_checkpoint(
    tiny_llama_dir, tmp_path, capsys
):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    code = main(
        [
            *["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(out)],
            *["--lr", "1e6", "--warmup-ratio", "0.5", "--max-steps", "12", "--save-steps", "1"],
            *["--batch-size", "2", "--experts", "2,3", "--no-eval", "--no-progress"],
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("mola: error: non-finite"), err
    found = re.search(r"at step (\d+);.* last good checkpoint: (\S+) ", err[0])
    assert found, err[0]
    step, good = int(found[1]), found[2]
    assert good.endswith(f"checkpoint-{step - 1}") or good.endswith(f"checkpoint-{step - 2}")
    weights = load_file(f"{good}/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # nothing after the last good checkpoint: no final adapter, no checkpoint that gives NaN
    assert not (out / "adapter_model.safetensors").exists()
    later = [p for p in out.glob("checkpoint-*") if int(p.name.split("-")[1]) >= step - 0]
    assert later == []
