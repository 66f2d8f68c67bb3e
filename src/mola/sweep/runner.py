"""Run a sweep: train each run in turn, skipping finished ones, resuming interrupted ones.

A run is *finished* when its ``metrics.json`` exists and the options recorded there match the
run's resolved options (see :func:`same_options`); it is skipped. A run with a ``checkpoint-N``
directory and a ``train_config.yaml`` matching its options is resumed from that checkpoint. A run
whose training raises is recorded in ``error.json`` (the error and its traceback) and the sweep
goes on. Each run trains in this process through :func:`mola.training.pipeline.run_training`,
its output (Trainer logs, warnings) going to ``sweep.log`` in its directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import yaml

from mola.sweep.spec import Run, SweepSpec
from mola.training.options import TrainOptions
from mola.utils.io import write_json

METRICS = "metrics.json"
ERROR = "error.json"
LOG = "sweep.log"
IGNORED_OPTIONS = frozenset({"output", "resume", "overwrite", "progress"})
"""Options that do not change what a run computes, left out when comparing configs."""

CHOSEN_AT_RUN = frozenset({"template"})
"""Options whose unset value (``None``) the run resolves from its data (``chat`` for
conversations, else ``alpaca``) and records: a recorded value matches an unset one."""


@dataclass
class RunState:
    """Where a run stands on disk: ``done``, ``failed``, ``stale`` (finished with other options),
    ``partial`` (a checkpoint to resume from) or ``pending``."""

    status: str
    metrics: dict[str, Any] | None = None
    error: str | None = None


def same_options(recorded: dict[str, Any], resolved: dict[str, Any]) -> bool:
    """Whether a run recorded with ``recorded`` options is the run ``resolved`` describes.

    Options in :data:`IGNORED_OPTIONS` are ignored; an option missing from ``recorded`` (added to
    mola after the run) matches when ``resolved`` holds its default.
    """
    defaults = {f.name: f.default for f in fields(TrainOptions)}
    for key, value in resolved.items():
        if key in IGNORED_OPTIONS or (value is None and key in CHOSEN_AT_RUN):
            continue
        if key in recorded:
            if recorded[key] != value:
                return False
        elif key not in defaults or value != defaults[key]:
            return False
    return True


def resolved_options(run: Run) -> dict[str, Any]:
    """The full option set ``mola train`` would use for this run (defaults filled in)."""
    return TrainOptions(**run.options).to_dict()


def run_state(run: Run) -> RunState:
    """Read a run's directory (see :class:`RunState`)."""
    resolved = resolved_options(run)
    metrics_path = os.path.join(run.output, METRICS)
    if os.path.isfile(metrics_path):
        metrics = _read_json(metrics_path)
        if metrics is not None and same_options(metrics.get("options") or {}, resolved):
            return RunState("done", metrics=metrics)
    if _resumable(run, resolved):
        return RunState("partial")
    if os.path.isfile(metrics_path):
        return RunState("stale")
    error_path = os.path.join(run.output, ERROR)
    if os.path.isfile(error_path):
        error = (_read_json(error_path) or {}).get("error", "unknown error")
        return RunState("failed", error=error)
    return RunState("pending")


def run_sweep(
    spec: SweepSpec,
    runs: list[Run] | None = None,
    echo: Callable[[str], None] | None = None,
    train: Callable[[TrainOptions], dict[str, Any]] | None = None,
) -> dict[str, RunState]:
    """Train every run of ``spec`` (or the given subset) that is not finished.

    Args:
        spec: the sweep.
        runs: the runs to consider (default: all of ``spec.runs()``), in order.
        echo: where progress lines go (default: stdout, flushed), one per run: index / total,
            its labels, its result.
        train: the training function (default :func:`mola.training.pipeline.run_training`).

    Returns:
        Each run's final state by name.
    """
    if train is None:
        from mola.training.pipeline import run_training as train
    echo = echo or _echo
    runs = spec.runs() if runs is None else runs
    states = {run.name: run_state(run) for run in runs}
    todo = sum(1 for s in states.values() if s.status != "done")
    durations: list[float] = []
    done_now = 0
    head = f"sweep {spec.path}: {len(runs)} runs, {len(runs) - todo} finished, {todo} to run"
    past = [_recorded_seconds(s.metrics) for s in states.values() if s.status == "done"]
    past = [p for p in past if p]
    if todo and past:  # until a run finishes here, estimate from the finished ones' timings
        head += f", ETA ~{_duration(todo * sum(past) / len(past))} (from their timings)"
    echo(head)
    for index, run in enumerate(runs, 1):
        head = f"[{index}/{len(runs)}] {run.describe()}"
        state = states[run.name]
        if state.status == "done":
            if not spec.keep_checkpoints:  # killed between its metrics and this cleanup
                _remove_checkpoints(run.output)
            echo(f"{head}: finished, skipped ({_result(state.metrics)})")
            continue
        opts = _options_for(run, state.status)
        start = time.perf_counter()
        try:
            metrics = _train_quietly(train, opts, run.output)
        except Exception as err:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
            message = f"{type(err).__name__}: {err}".strip().splitlines()[0]
            write_json(
                os.path.join(run.output, ERROR),
                {"error": message, "traceback": traceback.format_exc(), "run": run.name},
            )
            states[run.name] = RunState("failed", error=message)
            echo(f"{head}: FAILED ({message}); details in {os.path.join(run.output, ERROR)}")
        else:
            elapsed = time.perf_counter() - start
            durations.append(elapsed)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run.output, ERROR))
            if not spec.keep_checkpoints:
                _remove_checkpoints(run.output)
            states[run.name] = RunState("done", metrics=metrics)
            how = "resumed, " if opts.resume else ""
            echo(f"{head}: {how}{_result(metrics)}, {elapsed:.0f}s")
        finally:
            gc.collect()
        done_now += 1
        left = todo - done_now
        if left and durations:
            eta = left * sum(durations) / len(durations)
            echo(f"  {left} runs left, ETA {_duration(eta)}")
    return states


def _echo(line: str) -> None:
    print(line, flush=True)  # progress shows up at once in a redirected log too


def _options_for(run: Run, status: str) -> TrainOptions:
    options = dict(run.options)
    names = {f.name for f in fields(TrainOptions)}
    if status == "partial":
        options["resume"] = True
    elif os.path.isfile(os.path.join(run.output, METRICS)) and "overwrite" in names:
        options["overwrite"] = True  # its metrics.json came from other options: train again
    return TrainOptions(**options)


def _train_quietly(train: Callable[[TrainOptions], Any], opts: TrainOptions, output: str) -> Any:
    os.makedirs(output, exist_ok=True)
    with (
        open(os.path.join(output, LOG), "a", encoding="utf-8") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {dataclasses.asdict(opts)}", flush=True)
        return train(opts)


def _resumable(run: Run, resolved: dict[str, Any]) -> bool:
    from mola.training.trainer import last_checkpoint

    config = os.path.join(run.output, "train_config.yaml")
    if last_checkpoint(run.output) is None or not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as fh:
            recorded = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(recorded, dict) and same_options(recorded, resolved)


def _remove_checkpoints(output: str) -> None:
    for name in os.listdir(output):
        path = os.path.join(output, name)
        if name.startswith("checkpoint-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _result(metrics: dict[str, Any] | None) -> str:
    metrics = metrics or {}
    scores = metrics.get("fine_tuned") or {}
    parts = [f"{k} {v:.4f}" for k, v in scores.items() if k != "n" and isinstance(v, float)][:2]
    allocation = metrics.get("allocation") or {}
    if allocation.get("num_experts"):
        parts.append(f"{sum(allocation['num_experts'])} experts")
    if "trainable_params" in metrics:
        parts.append(f"{metrics['trainable_params']:,d} trainable")
    return ", ".join(parts) or "no metrics"


def _recorded_seconds(metrics: dict[str, Any] | None) -> float:
    timings = (metrics or {}).get("timings") or {}
    return float(sum(v for v in timings.values() if isinstance(v, int | float)))


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{max(minutes, 1)}m"
