"""``mola prune --adapter DIR --output DIR2``: drop rarely routed experts, merge redundant ones.

Routing loads are measured on ``--task``/``--data`` (the train split by default: pruning must
not look at the test items), each module's experts are pruned as :mod:`mola.inference.prune`
describes, and the pruned adapter is written to ``--output`` with ``prune_report.json`` (per
module and per decoder layer: experts before/after, dropped, merged, loads; metrics before and
after on the eval data). The pruned adapter loads like any other: its per-module expert counts
are stored as exact-name ``module_patterns``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

HELP = "drop experts with low routing load and merge near-identical ones"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mola.data.prompts import TEMPLATES
    from mola.inference.fused import add_group_argument

    parser.add_argument("--adapter", required=True, metavar="DIR", help="adapter to prune")
    parser.add_argument("--output", required=True, metavar="DIR", help="where to write the result")
    parser.add_argument("--model", help="base model (default: the one the adapter names)")
    parser.add_argument("--task", default="sarcasm", help="built-in task for the routing loads")
    parser.add_argument("--data", metavar="FILE", help="data file for the routing loads")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--limit", type=int, default=200, help="examples for the loads (0 = all)")
    parser.add_argument(
        "--eval-task", help="built-in task to evaluate before/after (default: --task, test split)"
    )
    parser.add_argument("--eval-data", metavar="FILE", help="evaluation file instead")
    parser.add_argument("--eval-limit", type=int, default=200, help="eval examples (0 = all)")
    parser.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    parser.add_argument(
        "--min-load",
        type=float,
        default=0.01,
        help="drop experts with a smaller share of the routing assignments (default 0.01)",
    )
    parser.add_argument(
        "--merge-threshold",
        type=float,
        default=0.05,
        help="merge experts whose update distance is at most this fraction of the larger "
        "update's norm (default 0.05; negative: never merge)",
    )
    parser.add_argument("--template", choices=TEMPLATES, help="default: the adapter's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from mola.models.placement import add_load_arguments

    add_load_arguments(parser)
    add_group_argument(parser)


def _check(args: argparse.Namespace) -> None:
    if os.path.abspath(args.output) == os.path.abspath(args.adapter):
        raise ValueError("--output: must differ from --adapter (the adapter is not overwritten)")
    for flag in ("limit", "eval_limit"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 0 (0 = all)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.min_load < 1.0:
        raise ValueError(f"--min-load: must be in [0, 1), got {args.min_load}")


def _evaluate(model: Any, tokenizer: Any, examples: list, template: str, args: Any) -> dict:
    from mola.evaluation.evaluate import evaluate

    metrics, _ = evaluate(
        model,
        tokenizer,
        examples,
        template=template,
        batch_size=args.batch_size,
        cutoff_len=args.cutoff_len,
        progress=not args.no_progress,
    )
    return metrics


def run(args: argparse.Namespace) -> int:
    from mola.analysis.collect import encode_batches
    from mola.core.config import MolaConfig
    from mola.data.datasets import limit_examples, load_examples
    from mola.data.prompts import DEFAULT_TEMPLATE
    from mola.inference.fused import group_for_cli
    from mola.inference.loads import measure_loads
    from mola.inference.prune import layer_summary, prune_model, pruned_patterns
    from mola.models.loading import load_adapted, training_template
    from mola.models.placement import load_options_from_args
    from mola.utils.io import write_json
    from mola.utils.tables import metrics_table, table

    _check(args)
    load = load_options_from_args(args)
    template = args.template or training_template(args.adapter) or DEFAULT_TEMPLATE
    calib = limit_examples(load_examples(args.task, args.data, args.split), args.limit or None)
    evaluation = []
    if not args.no_eval:
        eval_task = args.eval_task or (None if args.eval_data else args.task)
        evaluation = load_examples(eval_task, args.eval_data, "test")
        evaluation = limit_examples(evaluation, args.eval_limit or None)
    model, tokenizer = load_adapted(args.adapter, args.model, not args.no_progress, options=load)
    group_for_cli(model, args)
    metrics: dict[str, dict] = {}
    if evaluation:
        metrics["before"] = _evaluate(model, tokenizer, evaluation, template, args)
    batches = encode_batches(tokenizer, calib, template, args.cutoff_len, args.batch_size)
    loads = measure_loads(model, batches)
    report = prune_model(model, loads, args.min_load, args.merge_threshold)
    if evaluation:
        metrics["after"] = _evaluate(model, tokenizer, evaluation, template, args)
    config = model.mola_config.to_dict()
    config["module_patterns"] = {**pruned_patterns(model, report), **config["module_patterns"]}
    model.mola_config = MolaConfig.from_dict(config)
    model.save_pretrained(args.output)
    extra = os.path.join(args.adapter, "train_config.yaml")
    if os.path.isfile(extra):  # keeps the training template known to eval/generate
        shutil.copyfile(extra, os.path.join(args.output, "train_config.yaml"))
    layers = layer_summary(report)
    write_json(
        os.path.join(args.output, "prune_report.json"),
        {
            "adapter": os.path.abspath(args.adapter),
            "load_data": args.data or f"{args.task}/{args.split}",
            "load_examples": len(calib),
            "min_load": args.min_load,
            "merge_threshold": args.merge_threshold,
            "template": template,
            "metrics": metrics,
            "layers": layers,
            "modules": report,
        },
    )
    rows = [[r["layer"], r["before"], r["after"], r["dropped"], r["merged"]] for r in layers]
    print(table(["layer", "experts before", "after", "dropped", "merged"], rows))
    before = sum(r["before"] for r in layers)
    after = sum(r["after"] for r in layers)
    skipped = [e for e in report if e["skipped"]]
    print(f"experts: {before} -> {after} ({len(report)} modules, {len(skipped)} left unchanged)")
    for entry in skipped[:5]:
        print(f"  unchanged {entry['module']}: {entry['skipped']}")
    if metrics:
        print(metrics_table(metrics))
    print(f"wrote {args.output} (adapter, prune_report.json)")
    return 0
