"""lm-evaluation-harness tasks on a mola model (``mola eval --harness TASK[,TASK]``).

The harness's Hugging Face model class (``lm_eval.models.huggingface.HFLM``) wraps the model
object mola loaded, adapter included, with mola's tokenizer: the harness builds the requests
(prompts, few-shot examples, choices) and scores them through that object, on the device the
model is on, ``batch_size`` sequences at a time. ``--harness-include DIR`` adds a directory of
task YAML files (a local task over a local JSONL file needs no network); ``HF_HUB_OFFLINE=1``
keeps the harness's Hub data sets to the ``datasets`` cache.

Needs ``pip install 'mola-lora[harness]'`` (``lm_eval``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from mola.utils.io import write_text

RESULTS_NAME = "harness_results.json"
SAMPLES_NAME = "harness_samples.jsonl"


def parse_tasks(text: str) -> list[str]:
    """``--harness TASK[,TASK]`` as a list of task names.

    Raises:
        ValueError: no task name, or an empty one.
    """
    tasks = [t.strip() for t in str(text).split(",")]
    if not tasks or "" in tasks:
        raise ValueError(f"--harness: give task names separated by commas, got {text!r}")
    return tasks


def check_installed() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--harness needs lm-evaluation-harness: pip install 'mola-lora[harness]'")


def task_manager(tasks: list[str], include: str | None = None) -> Any:
    """The harness's ``TaskManager`` with ``include``'s YAMLs; every task checked to exist.

    Raises:
        ValueError: lm_eval missing, a missing include directory, or an unknown task.
    """
    check_installed()
    if include is not None and not os.path.isdir(include):
        raise ValueError(f"--harness-include: {include} is not a directory")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include})" if include else " (add task YAMLs with --harness-include)"
        raise ValueError(f"--harness: unknown task {', '.join(map(repr, unknown))}{where}")
    return manager


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    include: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    log_samples: bool = True,
    manager: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run harness tasks on ``model`` (a ``MolaModel`` or a plain HF causal LM).

    ``manager`` is the :func:`task_manager` of ``tasks`` and ``include`` when already made.
    ``progress=False`` hides the bars of the model's requests and of ``datasets`` (the harness
    still shows one while it builds each task's requests).

    Returns:
        The harness's ``simple_evaluate`` result (``results``, ``configs``, ``n-shot``, ...,
        and ``samples`` with each request's scores when ``log_samples``).

    Raises:
        ValueError: lm_eval missing, an unknown task (named, with the include directory), or an
            include directory that does not exist.
    """
    manager = manager or task_manager(tasks, include)
    import datasets
    from lm_eval import simple_evaluate

    lm = _model_class(progress)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
        )
    finally:
        if bars:
            datasets.enable_progress_bars()
    if results is None:  # not the main process of a distributed harness run
        raise ValueError("--harness: the harness returned no results")
    return results


def _model_class(progress: bool) -> type:
    """``HFLM``, or with ``progress=False`` one whose requests show no progress bars."""
    from lm_eval.models.huggingface import HFLM

    if progress:
        return HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def _default(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)


def write_results(results: dict[str, Any], output: str) -> list[str]:
    """``harness_results.json`` (all but the samples) and ``harness_samples.jsonl``.

    Returns:
        The paths written.
    """
    os.makedirs(output, exist_ok=True)
    summary = {k: v for k, v in results.items() if k != "samples"}
    path = os.path.join(output, RESULTS_NAME)
    text = json.dumps(summary, indent=2, default=_default, ensure_ascii=False) + "\n"
    write_text(path, text)
    written = [path]
    samples = results.get("samples")
    if samples:
        lines = [
            json.dumps({"task": task, **sample}, default=_default, ensure_ascii=False)
            for task, items in samples.items()
            for sample in items
        ]
        path = os.path.join(output, SAMPLES_NAME)
        write_text(path, "\n".join(lines) + "\n")
        written.append(path)
    return written


def results_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of the results (and of groups, if any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
