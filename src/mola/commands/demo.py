"""``mola demo``: the main job. Fine-tunes the default model on the default task with the
default MoLA recipe and prints zero-shot and fine-tuned accuracy on the held-out test split.

The recipe is :data:`DEMO_RECIPE`. It was tuned on the training split only (train on its first
items, validate on its last 300): 60 steps left the "yes"/"no" bias under-trained for most
seeds (53-60% on validation), 120 steps of 8 reached 75%. Any training flag overrides it, e.g.
``mola demo --task siqa``.
"""

from __future__ import annotations

import argparse

from mola.training.options import TrainOptions, add_option_flags, options_from_args
from mola.training.pipeline import run_training, summary
from mola.utils.distributed import is_main_process

HELP = "the main job: fine-tune the default recipe and print accuracy before/after"

DEMO_RECIPE: dict[str, object] = {
    "model": "smollm2-135m",
    "task": "sarcasm",
    "template": "qa",  # short prompts: a CPU step costs ~linear in tokens
    "experts": "inverted-triangle",
    "top_k": "2",
    "r": "8",
    "lr": 2e-3,
    "max_steps": 120,
    "batch_size": 8,
    "train_limit": 960,  # one pass over 960 training headlines
    "cutoff_len": 128,
    "save_steps": 0,
    "eval_before": True,
    "eval_batch_size": 32,
    "output": "runs/demo",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_flags(parser, defaults=DEMO_RECIPE)


def run(args: argparse.Namespace) -> int:
    """Train and evaluate; under ``torchrun`` / ``accelerate launch`` training is data-parallel
    and only the main process (global rank 0) prints, evaluates and writes (as ``mola train``)."""
    opts = options_from_args(args, **DEMO_RECIPE)
    main = is_main_process()
    if main:
        print(banner(opts))
    results = run_training(opts)
    if "dry_run" not in results and results.get("main_process", True):
        print(summary(results))
    return 0


def banner(opts: TrainOptions) -> str:
    """The first line: model, task, the shape trained (an ``--allocation`` file's lists, not the
    recipe's shape it replaces), steps and batch."""
    experts, top_k, ranks = opts.experts, opts.top_k, opts.r
    if opts.init_from:
        shape = f"experts of {opts.init_from}"
    else:
        if opts.allocation:
            from mola.core.allocation_file import read_allocation

            chosen = read_allocation(opts.allocation)
            experts, ranks = chosen["num_experts"], chosen["r"]
            top_k = chosen.get("top_k", top_k)
        shape = f"experts {_spec(experts)}, top-{_spec(top_k)}, r {_spec(ranks)}"
        if opts.allocation:
            shape += f" (from {opts.allocation})"
    steps = f"{opts.max_steps} steps of {opts.batch_size}"
    return f"mola demo: {opts.model} on {opts.data or opts.task}, {shape}, {steps}"


def _spec(value: object) -> str:
    """A layer spec as the flags spell it: ``2,4,6,8`` for a list."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
