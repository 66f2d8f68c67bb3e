"""``mola eval [--adapter DIR] [--task T | --data FILE] [--limit N]``: metrics of an adapter,
or of the base model (zero-shot) without ``--adapter``."""

from __future__ import annotations

import argparse
import os

from mola.data.datasets import limit_examples, load_examples
from mola.data.prompts import TEMPLATES
from mola.evaluation.evaluate import SCORINGS, evaluate
from mola.inference.compiled import add_compile_argument, compile_for_cli
from mola.models.hub import DEFAULT_MODEL
from mola.models.loading import load_adapted, load_base, training_template
from mola.models.placement import add_load_arguments, load_options_from_args
from mola.utils.io import check_writable_dir, write_json, write_jsonl
from mola.utils.tables import metrics_table

HELP = "evaluate an adapter (or the base model) on a task or file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="adapter directory (omit for the base model)")
    parser.add_argument("--model", help=f"base model (default: the adapter's, or {DEFAULT_MODEL})")
    parser.add_argument("--task", default="sarcasm", help="built-in task (default: sarcasm)")
    parser.add_argument("--data", help="evaluation file (JSON/JSONL/CSV); overrides --task")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--limit", type=int, help="evaluate the first N examples")
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        help="prompt template (default: the adapter's training template)",
    )
    parser.add_argument("--scoring", default="loglik", choices=SCORINGS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument(
        "--output",
        help="directory for metrics JSON and predictions (default: <adapter>/eval, or runs/eval)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_compile_argument(parser)
    add_load_arguments(parser)


def _check(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.cutoff_len < 2:
        raise ValueError(f"--cutoff-len: must be >= 2, got {args.cutoff_len}")


def _output_dir(args: argparse.Namespace) -> str:
    """Where metrics and predictions go; checked before any work.

    Raises:
        ValueError: the directory cannot be written, or it holds a training run whose
            ``metrics.json`` would be overwritten.
    """
    output = args.output or (os.path.join(args.adapter, "eval") if args.adapter else "runs/eval")
    check_writable_dir(output, "--output")
    run_files = [
        n
        for n in ("train_config.yaml", "adapter_config.json")
        if os.path.isfile(os.path.join(output, n))
    ]
    if run_files:
        raise ValueError(
            f"--output {output} holds a training run ({run_files[0]}); eval would overwrite its "
            "metrics.json: choose another --output (default: ADAPTER/eval)"
        )
    return output


def run(args: argparse.Namespace) -> int:
    _check(args)
    load = load_options_from_args(args)
    output = _output_dir(args)
    progress = not args.no_progress
    examples = limit_examples(load_examples(args.task, args.data, args.split), args.limit)
    template = args.template or training_template(args.adapter) or "alpaca"
    if args.adapter:
        model, tokenizer = load_adapted(args.adapter, args.model, progress, options=load)
    else:
        model, tokenizer = load_base(args.model or DEFAULT_MODEL, progress=progress, options=load)
    compile_for_cli(model, args.compile)
    metrics, records = evaluate(
        model,
        tokenizer,
        examples,
        template=template,
        scoring=args.scoring,
        batch_size=args.batch_size,
        cutoff_len=args.cutoff_len,
        progress=progress,
    )
    source = args.data or f"{args.task}/{args.split}"
    name = "adapter" if args.adapter else "base model"
    print(f"{name} on {source} ({len(examples)} examples, {template} template, {args.scoring})")
    print(metrics_table({name: metrics}))
    write_json(
        os.path.join(output, "metrics.json"),
        {
            "adapter": args.adapter,
            "data": source,
            "template": template,
            "scoring": args.scoring,
            "metrics": metrics,
        },
    )
    write_jsonl(os.path.join(output, "predictions.jsonl"), records)
    print(f"wrote {os.path.join(output, 'metrics.json')} and predictions.jsonl")
    return 0
