"""``mola analyze``: how a trained adapter uses its experts, as numbers and pictures.

``mola analyze --adapter DIR`` runs the adapted model over evaluation data (no training) and
writes into ``--output`` (default ``DIR/analysis``): ``analysis.json`` with every number (see
:func:`mola.analysis.analyze`), ``expert_load.png``, ``redundancy.png`` and ``entropy.png``; a
summary table goes to stdout.

``mola analyze --compare DIR1 DIR2 ...`` overlays the layer-mean redundancy and entropy curves of
several adapters (``redundancy_compare.png``, ``entropy_compare.png``, ``compare.json``; default
output ``./mola-compare``). Each DIR is an adapter directory, analysed now with the same data
options, or a previous analysis (an ``analysis.json`` file or a directory holding one), reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Callable
from typing import Any

from mola.analysis.report import REPORT_FORMAT
from mola.analysis.routing import DEFAULT_DEAD_THRESHOLD
from mola.inference.fused import add_group_argument, group_for_cli

HELP = "routing and expert analysis of a trained adapter (load, entropy, dead experts, redundancy)"

ANALYSIS_JSON = "analysis.json"
COMPARE_JSON = "compare.json"
DEFAULT_COMPARE_OUTPUT = "mola-compare"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``mola analyze`` options to ``parser``."""
    from mola.data.datasets import TASKS
    from mola.data.prompts import TEMPLATES

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", metavar="DIR", help="the adapter directory to analyse")
    source.add_argument(
        "--compare",
        nargs="+",
        metavar="DIR",
        help="overlay the redundancy and entropy curves of several adapters (or analysis dirs)",
    )
    parser.add_argument(
        "--task",
        default="sarcasm",
        help=f"built-in task whose test split is run ({', '.join(TASKS)}; default: sarcasm)",
    )
    parser.add_argument("--data", metavar="FILE", help="a data file instead of --task")
    parser.add_argument(
        "--limit", type=int, default=200, metavar="N", help="examples to run (default 200, 0 = all)"
    )
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        help="prompt template (default: the adapter's training template, else alpaca)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward")
    parser.add_argument("--cutoff-len", type=int, default=256, help="maximum tokens per example")
    parser.add_argument(
        "--dead-threshold",
        type=float,
        default=DEFAULT_DEAD_THRESHOLD,
        help="an expert with a smaller share of the assignments is dead (default 0.01)",
    )
    parser.add_argument(
        "--model", metavar="NAME_OR_DIR", help="base model (default: the one the adapter names)"
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help=f"output directory (default: ADAPTER/analysis; ./{DEFAULT_COMPARE_OUTPUT} to compare)",
    )
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="skip the data pass: redundancy only (no load/entropy numbers or plots)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from mola.models.placement import add_load_arguments

    add_load_arguments(parser)
    add_group_argument(parser)


def _check(args: argparse.Namespace) -> None:
    if args.limit < 0:
        raise ValueError(f"--limit: must be >= 0 (0 = all), got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.cutoff_len < 2:
        raise ValueError(f"--cutoff-len: must be >= 2, got {args.cutoff_len}")
    if not 0.0 <= args.dead_threshold < 1.0:
        raise ValueError(f"--dead-threshold: must be in [0, 1), got {args.dead_threshold}")
    if args.compare is not None and len(args.compare) < 2:
        raise ValueError("--compare: give at least two adapter (or analysis) directories")
    from mola.models.placement import load_options_from_args

    load_options_from_args(args)


def _write_json(path: str, data: Any) -> None:
    from mola.utils.io import atomic_write

    text = json.dumps(data, indent=2, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def _dir_label(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path))) or path


class _Data:
    """The examples and data options, loaded once on first use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._examples: list[Any] | None = None

    def examples(self) -> list[Any]:
        if self._examples is None:
            from mola.data.datasets import limit_examples, load_examples
            from mola.data.mixture import interleave, is_mixture, task_test_splits

            args = self.args
            if not args.data and is_mixture(args.task):  # every task in equal parts
                examples = interleave(task_test_splits(args.task).values())
            else:
                examples = load_examples(None if args.data else args.task, args.data, "test")
            self._examples = limit_examples(examples, args.limit or None)
        return self._examples

    def info(self) -> dict[str, Any]:
        args = self.args
        return {
            "task": None if args.data else args.task,
            "data": os.path.abspath(args.data) if args.data else None,
            "split": "test",
            "examples": len(self.examples()),
            "limit": args.limit or None,
            "template": args.template,
            "cutoff_len": args.cutoff_len,
            "batch_size": args.batch_size,
        }


def _analyze_adapter(adapter: str, args: argparse.Namespace, data: _Data) -> dict[str, Any]:
    """Load one adapter, run the analysis, return the report with run metadata."""
    import torch

    from mola.analysis.report import analyze, encode_batches
    from mola.data.prompts import DEFAULT_TEMPLATE
    from mola.models.loading import load_adapted, training_template
    from mola.models.placement import input_device, load_options_from_args

    progress = not args.no_progress
    template = args.template or training_template(adapter) or DEFAULT_TEMPLATE
    examples = None if args.weights_only else data.examples()  # bad data fails before loading
    load = load_options_from_args(args)
    model, tokenizer = load_adapted(adapter, model=args.model, progress=progress, options=load)
    device = input_device(model)
    try:
        group_for_cli(model, args)  # after placement: groups stack the bases where they are
        batches = None
        if examples is not None:
            batches = encode_batches(
                tokenizer, examples, template, args.cutoff_len, args.batch_size
            )
        report = analyze(model, batches, dead_threshold=args.dead_threshold, progress=progress)
        base = getattr(model.base_model.config, "_name_or_path", None)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {
        "label": _dir_label(adapter),
        "adapter": os.path.abspath(adapter),
        "base_model": args.model or base,
        "data": None if examples is None else {**data.info(), "template": template},
    }
    return {**{k: report[k] for k in ("format", "version", "mola_version")}, **meta, **report}


def _print_written(paths: list[str]) -> None:
    for path in paths:
        print(f"wrote {path}")


def _run_single(args: argparse.Namespace) -> int:
    from mola.analysis.plots import save_plots
    from mola.analysis.summary import format_summary
    from mola.utils.io import check_writable_dir

    output = args.output or os.path.join(args.adapter, "analysis")
    check_writable_dir(output, "--output")  # before the work, not after
    report = _analyze_adapter(args.adapter, args, _Data(args))
    os.makedirs(output, exist_ok=True)
    json_path = os.path.join(output, ANALYSIS_JSON)
    _write_json(json_path, report)
    written = [json_path, *save_plots(report, output)]
    print(format_summary(report))
    print()
    _print_written(written)
    return 0


def read_report(path: str) -> dict[str, Any] | None:
    """The saved analysis at ``path`` (a JSON file or a directory holding ``analysis.json``).

    Returns:
        The report, or ``None`` when ``path`` is not an analysis (e.g. an adapter directory).

    Raises:
        ValueError: the file is not valid JSON or not a mola analysis.
    """
    from mola.core.checkpoint import CONFIG_NAME

    if os.path.isfile(path) and path.lower().endswith(".json"):
        file = path
    elif (
        os.path.isdir(path)
        and not os.path.isfile(os.path.join(path, CONFIG_NAME))
        and os.path.isfile(os.path.join(path, ANALYSIS_JSON))
    ):
        file = os.path.join(path, ANALYSIS_JSON)
    else:
        return None
    try:
        with open(file, encoding="utf-8") as fh:
            report = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err.msg})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError(f"{file}: not a mola analysis (written by mola analyze --adapter)")
    if not report.get("label"):
        report["label"] = _dir_label(os.path.dirname(os.path.abspath(file)))
    return report


def _spec_text(report: dict[str, Any]) -> str:
    spec = (report.get("config") or {}).get("num_experts")
    if spec is None:
        return ""
    text = ",".join(map(str, spec)) if isinstance(spec, list) else str(spec)
    return text if len(text) <= 24 else text[:23] + "…"


def _legend_labels(reports: list[dict[str, Any]]) -> list[str]:
    labels = []
    for report in reports:
        label, spec = str(report.get("label") or "adapter"), _spec_text(report)
        labels.append(label if not spec or spec in label else f"{label} ({spec})")
    counts: dict[str, int] = {}
    unique = []
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label} [{counts[label]}]")
    return unique


def _compare_table(
    runs: list[tuple[str, dict[str, Any]]], field: str, spec: str, caption: str
) -> str:
    from mola.analysis.summary import format_table

    layers = sorted({item["layer"] for _, report in runs for item in report["layers"]})
    by_layer = [{item["layer"]: item for item in report["layers"]} for _, report in runs]
    rows = []
    for layer in layers:
        row = [str(layer)]
        for items in by_layer:
            value = items.get(layer, {}).get(field)
            row.append("-" if value is None else format(value, spec))
        rows.append(row)
    return caption + "\n" + format_table(["layer", *(label for label, _ in runs)], rows)


def _run_compare(args: argparse.Namespace) -> int:
    from mola.analysis.plots import (
        COMPARE_ENTROPY_PNG,
        COMPARE_REDUNDANCY_PNG,
        plot_compare_entropy,
        plot_compare_redundancy,
        save_figure,
    )
    from mola.utils.io import check_writable_dir

    check_writable_dir(args.output or DEFAULT_COMPARE_OUTPUT, "--output")
    data = _Data(args)
    reports, sources = [], []
    for path in args.compare:
        report = read_report(path)
        if report is None:
            report = _analyze_adapter(path, args, data)
        reports.append(report)
        sources.append(os.path.abspath(path))
    labels = _legend_labels(reports)
    runs = list(zip(labels, reports, strict=True))
    output = args.output or DEFAULT_COMPARE_OUTPUT
    os.makedirs(output, exist_ok=True)
    json_path = os.path.join(output, COMPARE_JSON)
    _write_json(
        json_path,
        {
            "format": f"{REPORT_FORMAT}-compare",
            "version": 1,
            "runs": [
                {"label": label, "source": source, "report": report}
                for (label, report), source in zip(runs, sources, strict=True)
            ],
        },
    )
    written = [json_path]
    figures: list[tuple[Callable[..., Any], str]] = [
        (plot_compare_redundancy, COMPARE_REDUNDANCY_PNG)
    ]
    tables = [("redundancy", ".4g", "Expert redundancy by layer (mean over modules)")]
    if any(report.get("has_routing") for report in reports):
        figures.append((plot_compare_entropy, COMPARE_ENTROPY_PNG))
        tables.append(("normalised_entropy", ".3f", "Routing entropy / log(E) by layer"))
    for draw, name in figures:
        written.append(save_figure(draw(runs), os.path.join(output, name)))
    print("\n\n".join(_compare_table(runs, *table) for table in tables))
    print()
    _print_written(written)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``mola analyze``; returns the exit status.

    Raises:
        ValueError: bad options, data, adapter or analysis files (one-line messages).
    """
    _check(args)
    if args.adapter is not None:
        return _run_single(args)
    return _run_compare(args)
