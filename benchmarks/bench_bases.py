"""The cost of a smaller base on the CPU: fp32, bf16, 8-bit and 4-bit bases of the default model.

For each base, in a fresh process: load time, resident memory added by loading, the median time
of an AdamW training step of the default MoLA adapter (batch 4 of the default task, cutoff 64),
and accuracy on the first ``--limit`` test items of ``--task`` (log-likelihood scoring) of
``--adapter`` on that base, or of the base model alone (zero-shot) without ``--adapter``.

    python benchmarks/bench_bases.py [--adapter runs/demo] [--task sarcasm] [--limit 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

BASES = {
    "fp32": ["--dtype", "float32"],
    "bf16": ["--dtype", "bfloat16"],
    "8-bit": ["--load-in-8bit"],
    "4-bit": ["--load-in-4bit"],
}

ONE = r"""
import json, statistics, sys, time, psutil, torch
from mola import get_mola_model
from mola.data.datasets import limit_examples, load_task
from mola.data.prompts import DataCollator, encode_for_training
from mola.evaluation.evaluate import evaluate
from mola.models.loading import load_adapted, load_base
from mola.models.placement import LoadOptions
from mola.models.precision import prepare_kbit_training, quantized_bits
from mola.training.options import TrainOptions
args = json.loads(sys.argv[1])
options = LoadOptions(device="cpu", **args["load"])
rss = psutil.Process().memory_info().rss
start = time.perf_counter()
base, tokenizer = load_base("smollm2-135m", progress=False, options=options)
for p in base.parameters():
    p.data.mul_(1)  # touch every page: memory-mapped weights count once they are read
load_s = time.perf_counter() - start
loaded = psutil.Process().memory_info().rss - rss
if quantized_bits(base) is not None:
    prepare_kbit_training(base, False)
model = get_mola_model(base, TrainOptions().mola_config()).train()
examples = load_task(args["task"], "train")[:4]
rows = [encode_for_training(tokenizer, e, "alpaca", 64, False) for e in examples]
batch = DataCollator(tokenizer.pad_token_id)(rows)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
times = []
for i in range(4):
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i:
        times.append(time.perf_counter() - start)
del model, optimizer, base
if args["adapter"]:
    evaluated, tokenizer = load_adapted(args["adapter"], progress=False, options=options)
else:
    evaluated, tokenizer = load_base("smollm2-135m", progress=False, options=options)
test = limit_examples(load_task(args["task"], "test"), args["limit"])
metrics, _ = evaluate(evaluated, tokenizer, test, template="alpaca", progress=False)
print(json.dumps({"load_s": load_s, "loaded_mb": loaded / 1e6,
                  "step_s": statistics.median(times), "accuracy": metrics.get("accuracy")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="adapter to evaluate on each base (default: none)")
    parser.add_argument("--task", default="sarcasm")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    print("| base | load s | memory MB | train step s | accuracy |")
    print("|---|---|---|---|---|")
    for name, flags in BASES.items():
        load = {
            "dtype": flags[1] if flags[0] == "--dtype" else "float32",
            "load_in_4bit": "--load-in-4bit" in flags,
            "load_in_8bit": "--load-in-8bit" in flags,
        }
        spec = {"load": load, "task": args.task, "limit": args.limit, "adapter": args.adapter}
        done = subprocess.run(
            [sys.executable, "-c", ONE, json.dumps(spec)], capture_output=True, text=True, env=env
        )
        if done.returncode:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} | | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        print(
            f"| {name} | {r['load_s']:.1f} | {r['loaded_mb']:.0f} | {r['step_s']:.2f} | {acc} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
