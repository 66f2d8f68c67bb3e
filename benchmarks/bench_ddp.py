"""Data-parallel throughput of ``mola train``: 1 process against N at an equal global batch.

Each configuration is a real ``mola train`` run (under ``torchrun`` for N > 1) on the first
``steps x global batch`` examples of the task, so every example is seen exactly once; the
throughput is the number of non-padding tokens of those examples over the Trainer's
``train_runtime`` (model loading and process start-up excluded). The CPU threads are split
evenly between the processes, so on one machine the comparison is at equal total cores.

    python benchmarks/bench_ddp.py [--model smollm2-135m] [--steps 10] [--global-batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def mola_script() -> str:
    script = Path(sys.executable).with_name("mola")
    return str(script) if script.is_file() else "mola"


def count_tokens(model: str, task: str, n: int, cutoff: int) -> int:
    from mola.data.datasets import load_task
    from mola.data.prompts import encode_for_training
    from mola.models.loading import load_base

    _, tokenizer = load_base(model, progress=False)
    examples = load_task(task, "train")[:n]
    return sum(
        len(encode_for_training(tokenizer, e, "alpaca", cutoff)["input_ids"]) for e in examples
    )


def run(procs: int, threads: int, args: argparse.Namespace, out: str) -> float:
    train = [
        *["train", "--model", args.model, "--task", args.task, "--output", out],
        *["--train-limit", str(args.steps * args.global_batch), "--max-steps", str(args.steps)],
        *["--batch-size", str(args.global_batch // procs), "--save-steps", "0"],
        *["--cutoff-len", str(args.cutoff_len), "--no-eval", "--no-progress", "--overwrite"],
    ]
    launch = [mola_script()]
    if procs > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += ["--nproc-per-node", str(procs), mola_script()]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*launch, *train], env=env, check=True, capture_output=True, text=True)
    metrics = json.loads(Path(out, "metrics.json").read_text())
    return float(metrics["train"]["train_runtime"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sarcasm")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=128)
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="in all")
    args = parser.parse_args()
    counts = [int(p) for p in args.procs.split(",")]
    tokens = count_tokens(args.model, args.task, args.steps * args.global_batch, args.cutoff_len)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in counts:
            threads = max(args.threads // procs, 1)
            seconds = run(procs, threads, args, os.path.join(tmp, f"p{procs}"))
            rows.append((procs, threads, seconds, tokens / seconds))
    base = rows[0][3]
    print(
        f"mola train, {args.model}, {args.steps} steps of global batch {args.global_batch} "
        f"({tokens} tokens), {'cuda' if torch.cuda.is_available() else 'cpu'}, "
        f"torch {torch.__version__}, {args.threads} threads in all"
    )
    print("| processes | threads each | per-device batch | train s | tokens/s | vs 1 process |")
    print("|---|---|---|---|---|---|")
    for procs, threads, seconds, tps in rows:
        print(
            f"| {procs} | {threads} | {args.global_batch // procs} | {seconds:.1f} | {tps:.0f} | "
            f"{tps / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
