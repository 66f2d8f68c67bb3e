"""Experiment trackers: ``--report-to tensorboard|wandb|mlflow|none`` (or a comma list).

The names go to the Trainer's own integrations (``TrainingArguments.report_to``), which log
every logged value: the loss, the learning rate, and mola's ``lm_loss``, ``aux_loss`` and each
router loss of the method (``z_loss``, ``l1_loss``, ...) as series of their own. On top of what
the Trainer sends (its ``TrainingArguments`` and the model config), :class:`RunConfigCallback`
logs the run's resolved mola options as its configuration: W&B ``config["mola"]``, MLflow
parameters ``mola.<option>``, a TensorBoard text ``mola_options``. A W&B run that the Trainer
started is finished when training ends, so offline runs are complete on disk.

Configure the trackers as usual through their environment: ``WANDB_PROJECT``, ``WANDB_MODE=
offline``, ``MLFLOW_TRACKING_URI`` (``file:./mlruns`` for a local store),
``MLFLOW_EXPERIMENT_NAME``. W&B and MLflow are optional: ``pip install 'mola-lora[trackers]'``.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from transformers import TrainerCallback

TRACKERS = ("tensorboard", "wandb", "mlflow")
"""What ``--report-to`` accepts, besides ``none``."""

_INSTALL = {
    "tensorboard": "pip install tensorboard",
    "wandb": "pip install 'mola-lora[trackers]'",
    "mlflow": "pip install 'mola-lora[trackers]'",
}
MLFLOW_PARAM_LIMIT = 6000  # characters of one MLflow parameter value


def parse_report_to(text: str | list[str] | None) -> list[str]:
    """``--report-to`` as the Trainer's ``report_to`` list (``none`` -> ``[]``).

    Raises:
        ValueError: an unknown name, or ``none`` together with a tracker.
    """
    if text is None:
        return []
    items = text if isinstance(text, list) else str(text).split(",")
    names = list(dict.fromkeys(str(i).strip().lower() for i in items if str(i).strip()))
    if not names:
        raise ValueError("--report-to: give tensorboard, wandb, mlflow (comma-separated) or none")
    if "none" in names:
        if len(names) > 1:
            raise ValueError(
                f"--report-to: 'none' with {', '.join(n for n in names if n != 'none')}"
            )
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(
            f"--report-to: unknown tracker {unknown[0]!r} (choose from {', '.join(TRACKERS)} "
            "or none; a comma list for several)"
        )
    return names


def check_installed(names: list[str]) -> None:
    """Every tracker's package is importable.

    Raises:
        ValueError: one is missing (named, with its pip line).
    """
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--report-to {name}: the {name} package is missing: {_INSTALL[name]}")
    if "mlflow" in names:
        check_mlflow_store()


def check_mlflow_store() -> None:
    """MLflow can open its tracking store (checked before the work, not mid-run).

    MLflow 3 refuses a directory store (its default ``./mlruns``) unless
    ``MLFLOW_ALLOW_FILE_STORE=true``, and ``mlflow-skinny`` has no SQL backend.

    Raises:
        ValueError: the store cannot be opened (one line: the URI and MLflow's first sentence).
    """
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        mlflow.tracking.MlflowClient(tracking_uri=uri)._tracking_client.store  # noqa: B018
    except Exception as err:  # MlflowException, ImportError of a backend, ...
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = text.split(". ")[0].rstrip(".")
        raise ValueError(
            f"--report-to mlflow: cannot open the tracking store {uri} ({reason}); set "
            "MLFLOW_TRACKING_URI, or MLFLOW_ALLOW_FILE_STORE=true for a local directory"
        ) from None


def _flat(options: dict[str, Any]) -> dict[str, str]:
    """Options as MLflow parameter strings (``None`` -> ``"None"``; long values cut)."""
    out = {}
    for key, value in options.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[f"mola.{key}"] = text[:MLFLOW_PARAM_LIMIT]
    return out


class RunConfigCallback(TrainerCallback):
    """Logs mola's resolved options as the run config of each tracker in ``report_to``.

    Added after the Trainer's integration callbacks, so their ``on_train_begin`` has started
    the runs (and the TensorBoard writer) when this one's runs. ``callbacks`` is the Trainer's
    callback list, where the TensorBoard writer is found.
    """

    def __init__(self, options: dict[str, Any], report_to: list[str], callbacks: list) -> None:
        self.options = options
        self.report_to = report_to
        self.callbacks = callbacks
        self.finish_wandb = False
        if "wandb" in report_to:
            import wandb

            self.finish_wandb = wandb.run is None  # the Trainer will start it: end it too

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not state.is_world_process_zero:
            return control
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is not None:
                wandb.config.update({"mola": self.options}, allow_val_change=True)
        if "mlflow" in self.report_to:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_params(_flat(self.options))
        if "tensorboard" in self.report_to:
            text = "```\n" + json.dumps(self.options, indent=2) + "\n```"
            for callback in self.callbacks:
                writer = getattr(callback, "tb_writer", None)
                if type(callback).__name__ == "TensorBoardCallback" and writer is not None:
                    writer.add_text("mola_options", text)
                    writer.flush()
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.finish_wandb and state.is_world_process_zero:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        return control
