"""``mola eval [--adapter DIR] [--task T | --data FILE] [--limit N]``: metrics of an adapter,
or of the base model (zero-shot) without ``--adapter``.

``--harness TASK[,TASK]`` runs lm-evaluation-harness tasks on the same model object instead of
mola's own scoring (:mod:`mola.evaluation.harness`); their results go to
``harness_results.json`` in the output directory, where mola's ``metrics.json`` goes."""

from __future__ import annotations

import argparse
import os
from typing import Any

from mola.data.datasets import limit_examples
from mola.data.mixture import is_mixture, task_test_splits
from mola.data.prompts import TEMPLATES, default_template
from mola.data.sources import load_examples
from mola.evaluation.evaluate import SCORINGS, evaluate_tasks
from mola.inference.compiled import add_compile_argument, compile_for_cli
from mola.inference.fused import add_group_argument, group_for_cli
from mola.models.hub import DEFAULT_MODEL
from mola.models.loading import load_adapted, load_base, training_template
from mola.models.placement import add_load_arguments, load_options_from_args
from mola.utils.io import check_writable_dir, write_json, write_jsonl
from mola.utils.tables import metrics_table

HELP = "evaluate an adapter (or the base model) on a task or file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="adapter directory (omit for the base model)")
    parser.add_argument("--model", help=f"base model (default: the adapter's, or {DEFAULT_MODEL})")
    parser.add_argument(
        "--task",
        default="sarcasm",
        help="built-in task; several joined by + are each scored on their own split, reported "
        "as <task>_<metric> and averaged (default: sarcasm)",
    )
    parser.add_argument(
        "--data",
        help="evaluation data: JSON/JSONL/CSV/Parquet file, save_to_disk dir or Hub id ORG/NAME; "
        "overrides --task",
    )
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument(
        "--data-split", help="split of --data when it has several (default: --split)"
    )
    parser.add_argument("--data-config", help="configuration name of a Hub dataset")
    parser.add_argument(
        "--data-columns", help="rename columns to mola's fields: question=query,answer=label"
    )
    parser.add_argument(
        "--limit", type=int, help="evaluate the first N examples (of each task, for a mixture a+b)"
    )
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
    parser.add_argument(
        "--harness",
        metavar="TASK[,TASK]",
        help="run lm-evaluation-harness tasks instead of mola's scoring (mola-lora[harness])",
    )
    parser.add_argument(
        "--harness-include", metavar="DIR", help="directory of extra harness task YAML files"
    )
    parser.add_argument(
        "--num-fewshot", type=int, help="few-shot examples per harness prompt (default: task's)"
    )
    add_compile_argument(parser)
    add_load_arguments(parser)
    add_group_argument(parser)


def _check(args: argparse.Namespace) -> None:
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot: must be >= 0, got {args.num_fewshot}")
    if args.harness_include and not args.harness:
        raise ValueError("--harness-include: only with --harness TASK")
    if args.num_fewshot is not None and not args.harness:
        raise ValueError("--num-fewshot: only with --harness TASK")
    if args.harness and args.data:
        raise ValueError(
            "--harness runs the harness's own tasks, not --data: put the file in a task YAML "
            "(--harness-include) or drop --harness"
        )
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
    if args.harness:
        return _run_harness(args, output, progress, load)
    sets = _eval_sets(args)
    examples = [e for task_examples in sets.values() for e in task_examples]
    template = args.template or training_template(args.adapter) or default_template(examples)
    model, tokenizer = _load_model(args, progress, load)
    compile_for_cli(model, args.compile)
    group_for_cli(model, args)
    metrics, records = evaluate_tasks(
        model,
        tokenizer,
        sets,
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


def _eval_sets(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The examples to score by task: a mixture ``a+b`` scores each task's split on its own
    (``--limit`` items of each, as training's ``--eval-limit``); else one set under ``""``."""
    if not args.data and is_mixture(args.task):
        splits = task_test_splits(args.task, args.split)
        return {name: limit_examples(examples, args.limit) for name, examples in splits.items()}
    examples = load_examples(
        args.task,
        args.data,
        args.split,
        data_split=args.data_split or args.split,
        data_config=args.data_config,
        data_columns=args.data_columns,
    )
    return {"": limit_examples(examples, args.limit)}


def _load_model(args: argparse.Namespace, progress: bool, load: Any) -> tuple[Any, Any]:
    """The adapted model (or the base model alone), placed and stored as ``load`` says."""
    if args.adapter:
        return load_adapted(args.adapter, args.model, progress, options=load)
    return load_base(args.model or DEFAULT_MODEL, progress=progress, options=load)


def _run_harness(args: argparse.Namespace, output: str, progress: bool, load: Any) -> int:
    """``--harness``: the harness's tasks on mola's model; its table and results JSON."""
    from mola.evaluation.harness import (
        parse_tasks,
        results_table,
        run_harness,
        task_manager,
        write_results,
    )

    tasks = parse_tasks(args.harness)
    manager = task_manager(tasks, args.harness_include)  # unknown tasks fail before the model
    model, tokenizer = _load_model(args, progress, load)
    compile_for_cli(model, args.compile)
    group_for_cli(model, args)
    results = run_harness(
        model,
        tokenizer,
        tasks,
        include=args.harness_include,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        manager=manager,
        progress=progress,
    )
    name = "adapter" if args.adapter else "base model"
    print(f"{name} on lm-evaluation-harness {', '.join(tasks)}")
    print(results_table(results))
    written = write_results(results, output)
    print(f"wrote {' and '.join(written)}")
    return 0
