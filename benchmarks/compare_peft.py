"""Accuracy of mola against PEFT LoRA under the identical recipe, in one process.

Both start from the same base model and see the same training examples in the same order with
the same prompt template, learning rate, schedule, batch size, steps and seed (the ``mola demo``
recipe unless flags say otherwise); both are scored by the same log-likelihood evaluator on the
same held-out test items. PEFT LoRA uses rank 8 on the same seven projections; mola uses the
default layer-wise mixture (inverted-triangle, top-2, rank 8 per expert).

    python benchmarks/compare_peft.py [--task sarcasm] [--steps 60] [--lr 2e-3]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

from transformers import set_seed

from mola import get_mola_model
from mola.data import limit_examples, load_task
from mola.demo_cmd import DEMO_RECIPE
from mola.evaluation import evaluate
from mola.loading import load_base
from mola.options import TrainOptions
from mola.prompts import DataCollator, encode_for_training
from mola.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEMO_RECIPE["task"])
    parser.add_argument("--steps", type=int, default=DEMO_RECIPE["max_steps"])
    parser.add_argument("--lr", type=float, default=DEMO_RECIPE["lr"])
    parser.add_argument("--output", default="runs/compare-peft")
    args = parser.parse_args()
    recipe = {
        **DEMO_RECIPE,
        "task": args.task,
        "max_steps": args.steps,
        "lr": args.lr,
        "eval_before": False,
        "progress": False,
    }
    opts = TrainOptions(**recipe)
    base, tokenizer = load_base(opts.model, progress=False)
    train_examples = limit_examples(load_task(opts.task, "train"), opts.train_limit)
    test_examples = limit_examples(load_task(opts.task, "test"), opts.eval_limit)
    rows = [
        encode_for_training(tokenizer, e, opts.template, opts.cutoff_len) for e in train_examples
    ]
    collate = DataCollator(tokenizer.pad_token_id)

    def score(model):
        metrics, _ = evaluate(
            model,
            tokenizer,
            test_examples,
            template=opts.template,
            batch_size=opts.eval_batch_size,
            cutoff_len=opts.cutoff_len,
            progress=False,
        )
        return metrics["accuracy"]

    zero_shot = score(base)
    results = {}
    for name in ("PEFT LoRA r8", "mola inverted-triangle top-2 r8"):
        set_seed(opts.seed)
        fresh = copy.deepcopy(base)
        if name.startswith("PEFT"):
            from peft import LoraConfig, get_peft_model

            cfg = opts.mola_config()
            model = get_peft_model(
                fresh,
                LoraConfig(
                    r=8,
                    lora_alpha=cfg.lora_alpha,
                    lora_dropout=cfg.lora_dropout,
                    target_modules=list(cfg.target_modules),
                    task_type="CAUSAL_LM",
                ),
            )
        else:
            model = get_mola_model(fresh, opts.mola_config())
        out = dataclasses.replace(opts, output=f"{args.output}/{name.split()[0].lower()}")
        start = time.perf_counter()
        train(model, rows, collate, out)
        seconds = time.perf_counter() - start
        results[name] = (score(model), seconds)
    print(
        f"{opts.task}: {len(train_examples)} training examples, {opts.max_steps} steps of "
        f"{opts.batch_size}, lr {opts.lr}, {opts.template} template; {len(test_examples)} test "
        f"items; zero-shot accuracy {100 * zero_shot:.1f}%"
    )
    print("| adapter | fine-tuned accuracy | gain | train time |")
    print("|---|---|---|---|")
    for name, (acc, seconds) in results.items():
        print(f"| {name} | {100 * acc:.1f}% | {100 * (acc - zero_shot):+.1f} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
