"""The training job behind ``mola train`` and ``mola demo``: data, model, train, evaluate."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import yaml
from transformers import set_seed

from mola.core.checkpoint import check_adapter_files
from mola.core.config import MolaConfig
from mola.core.model import MolaModel, get_mola_model
from mola.data.datasets import Example, limit_examples, load_task
from mola.data.mixture import is_mixture, task_test_splits
from mola.data.prompts import (
    DataCollator,
    check_template_fits,
    default_template,
    encode_training_set,
)
from mola.data.sources import load_examples
from mola.evaluation.evaluate import evaluate_tasks
from mola.experts.pretrained import freeze_experts
from mola.models.loading import load_base
from mola.models.precision import prepare_kbit_training, quantized_bits
from mola.training.options import TrainOptions
from mola.training.outputs import check_output, clear_previous_run, notes
from mola.training.trackers import check_installed as check_trackers
from mola.training.trackers import parse_report_to
from mola.utils.distributed import check_launch, is_main_process
from mola.utils.io import write_json, write_jsonl, write_text
from mola.utils.tables import metrics_table

EvalSets = dict[str, list[Example]]
"""Evaluation examples by task name; ``""`` for a single task or an evaluation file."""


def load_train_eval(opts: TrainOptions) -> tuple[list[Example], EvalSets | None]:
    """Training examples and evaluation examples (``None`` when there is nothing to evaluate).

    Evaluation uses ``--eval-data`` if given, else the built-in task's test split (each task's
    own, ``--eval-limit`` items of each, for a mixture ``a+b``); a user training file without
    ``--eval-data`` is not evaluated.
    """
    source = {"data_config": opts.data_config, "data_columns": opts.data_columns}
    train = load_examples(opts.task, opts.data, "train", data_split=opts.data_split, **source)
    train = limit_examples(train, opts.train_limit)
    evaluation: EvalSets | None = None
    if opts.eval or opts.eval_before:
        if opts.eval_data:
            split = opts.eval_data_split or "test"
            evaluation = {
                "": load_examples(None, opts.eval_data, "test", data_split=split, **source)
            }
        elif not opts.data and is_mixture(opts.task):
            evaluation = task_test_splits(opts.task)
        elif not opts.data:
            evaluation = {"": load_task(opts.task, "test")}
        if evaluation is not None:
            evaluation = {k: limit_examples(v, opts.eval_limit) for k, v in evaluation.items()}
    return train, evaluation


def run_training(opts: TrainOptions) -> dict[str, Any]:
    """Fine-tune with MoLA as ``opts`` says; writes the adapter, config, logs and metrics.

    Under ``torchrun`` / ``accelerate launch`` every process trains its share of each global
    batch, and only the main process (global rank 0) writes files, prints and shows progress
    bars; evaluation runs on the main process alone, after training.

    Returns:
        The metrics written to ``<output>/metrics.json`` (on the main process; the others
        return their options and training metrics only, with ``"main_process": False``).
    """
    from mola.training.trainer import train  # imports the Trainer stack only when training

    check_launch()
    check_trackers(parse_report_to(opts.report_to))  # a missing package fails before the work
    set_seed(opts.seed)
    main = is_main_process()
    if opts.dry_run:
        from mola.training.dry_run import dry_run

        return dry_run(opts, show=main)
    if not main:
        opts = dataclasses.replace(opts, progress=False)
    if main:
        check_output(opts)  # refuse to clobber a run; unwritable output fails before the work
        for note in notes(opts):
            print(f"mola: note: {note}")
    if opts.init_from:
        check_adapter_files(opts.init_from)  # a damaged adapter fails before the model loads
    mola_config = MolaConfig.load(opts.init_from) if opts.init_from else opts.mola_config()
    train_examples, eval_examples = load_train_eval(opts)
    if opts.template is None:  # chat for conversations, else alpaca; recorded in the run config
        opts = dataclasses.replace(opts, template=default_template(train_examples))
    evaluated = [e for examples in (eval_examples or {}).values() for e in examples]
    check_template_fits(train_examples + evaluated, opts.template)
    base, tokenizer = load_base(
        opts.model, progress=opts.progress, options=opts.load_options(training_device(opts))
    )
    if quantized_bits(base) is not None:
        prepare_kbit_training(base, opts.gradient_checkpointing)
    if opts.allocation:  # a list of another length would be read as layer groups
        from mola.core.allocation_file import check_fits

        check_fits(
            {"num_experts": mola_config.num_experts}, len(_decoder_blocks(base)), opts.allocation
        )
    _check_fits(base, mola_config)  # fail on a bad spec or target before any work
    if main:
        if opts.overwrite:
            clear_previous_run(opts.output)
        os.makedirs(opts.output, exist_ok=True)
        write_text(os.path.join(opts.output, "train_config.yaml"), yaml.safe_dump(opts.to_dict()))

    def run_eval(model: Any, name: str) -> dict[str, float]:
        metrics, records = evaluate_tasks(
            model,
            tokenizer,
            eval_examples,
            template=opts.template,
            scoring=opts.scoring,
            batch_size=opts.eval_batch_size,
            cutoff_len=opts.cutoff_len,
            progress=opts.progress,
        )
        write_jsonl(os.path.join(opts.output, f"predictions_{name}.jsonl"), records)
        return metrics

    results: dict[str, Any] = {"options": opts.to_dict()}
    timings: dict[str, float] = {}
    if main and opts.eval_before and eval_examples is not None:
        start = time.perf_counter()
        results["zero_shot"] = run_eval(base, "zero_shot")
        timings["eval_zero_shot_s"] = time.perf_counter() - start

    model = build_model(base, mola_config, opts)
    model.logits_only_where_labelled = True  # same loss, no vocab head on prompt positions
    trainable, total = model.num_parameters_split()
    if main:
        print(
            f"mola: {_plural(len(train_examples), 'training example')}; experts per layer "
            f"{model.allocation['num_experts']}; trainable params {trainable:,d} of {total:,d}"
            f"; base {_base_kind(base)}"
        )
    rows = encode_training_set(
        tokenizer,
        train_examples,
        opts.template,
        opts.cutoff_len,
        opts.train_on_inputs,
        warn=print if main else lambda line: None,
    )
    start = time.perf_counter()
    trained = train(model, rows, DataCollator(tokenizer.pad_token_id), opts)
    timings["train_s"] = time.perf_counter() - start
    if not main:
        return {"options": opts.to_dict(), "train": trained["train"], "main_process": False}
    write_jsonl(os.path.join(opts.output, "train_log.jsonl"), trained["log_history"])
    results.update(
        allocation=model.allocation,
        trainable_params=trainable,
        total_params=total,
        train=trained["train"],
        resumed_from=trained["resumed_from"],
    )
    if opts.eval and eval_examples is not None:
        start = time.perf_counter()
        results["fine_tuned"] = run_eval(model, "fine_tuned")
        timings["eval_fine_tuned_s"] = time.perf_counter() - start
    results["timings"] = timings
    write_json(os.path.join(opts.output, "metrics.json"), results)
    return results


def training_device(opts: TrainOptions) -> str:
    """Where the base model is loaded for training: the CPU (the Trainer moves it), except a
    quantized base, which bitsandbytes quantizes on its device: this process's GPU."""
    import torch

    if not (opts.load_in_4bit or opts.load_in_8bit) or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def build_model(base: Any, config: MolaConfig, opts: TrainOptions) -> MolaModel:
    """A fresh adapter, or with ``--init-from`` the saved one (its own config and weights) with
    its experts frozen unless ``--train-experts``: routers only, as for composed LoRAs."""
    if not opts.init_from:
        return get_mola_model(base, config)
    model = MolaModel.from_pretrained(base, opts.init_from, is_trainable=True)
    if not opts.train_experts:
        freeze_experts(model)
    return model


def _base_kind(base: Any) -> str:
    """``float32``, ``bfloat16``, ``4-bit nf4`` or ``8-bit``: how the frozen base is stored."""
    bits = quantized_bits(base)
    if bits is not None:
        return "4-bit nf4" if bits == 4 else "8-bit"
    param = next(iter(base.parameters()), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "?"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary(results: dict[str, Any]) -> str:
    """The end-of-run summary: metrics per evaluated model, timings, where outputs went."""
    evaluated = {k: results[k] for k in ("zero_shot", "fine_tuned") if k in results}
    lines = []
    if evaluated:
        lines.append(metrics_table(evaluated))
    if "zero_shot" in results and "fine_tuned" in results and "accuracy" in results["zero_shot"]:
        gain = results["fine_tuned"]["accuracy"] - results["zero_shot"]["accuracy"]
        lines.append(
            f"accuracy: {100 * results['zero_shot']['accuracy']:.1f}% -> "
            f"{100 * results['fine_tuned']['accuracy']:.1f}% ({100 * gain:+.1f} points)"
        )
    times = ", ".join(f"{k.removesuffix('_s')} {v:.0f}s" for k, v in results["timings"].items())
    lines.append(f"time: {times}")
    lines.append(f"adapter, metrics.json and logs in {results['options']['output']}")
    return "\n".join(lines)


def _decoder_blocks(model: Any) -> Any:
    from mola.core.injection import find_decoder_layers

    return find_decoder_layers(model)[1]


def _check_fits(model: Any, config: Any) -> None:
    """The layer specs resolve and every target module exists in ``model``, named by flag."""
    from mola.core.injection import check_target_modules, find_decoder_layers

    blocks = find_decoder_layers(model)[1]
    try:
        config.resolve(len(blocks))
    except ValueError as err:
        raise ValueError(
            f"--experts/--top-k/--r for this model's {len(blocks)} decoder layers: {err}"
        ) from None
    try:
        check_target_modules(model, config.target_modules)
    except ValueError as err:
        raise ValueError(f"--target-modules: {str(err).removeprefix('target_modules: ')}") from None
