"""The output directory of ``mola train``: refuse to clobber a run, check it before the work.

A directory *holds a run* when it has the files a run leaves (the adapter, ``metrics.json`` or
``checkpoint-N/`` directories). Training into it is refused unless ``--resume`` (continue that
run) or ``--overwrite`` (replace it: the earlier run's outputs are removed first, so none of
them can be mistaken for the new run's).
"""

from __future__ import annotations

import glob
import os
import shutil

from mola.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_adapter_files
from mola.training.options import TrainOptions
from mola.utils.io import check_writable_dir

FINISHED = (WEIGHTS_NAME, CONFIG_NAME, "metrics.json")
"""Files whose presence means the directory holds a finished run."""

RUN_OUTPUTS = (
    WEIGHTS_NAME,
    CONFIG_NAME,
    "metrics.json",
    "train_config.yaml",
    "train_log.jsonl",
    "predictions_*.jsonl",
    "checkpoint-*",
)
"""What a run writes into ``--output`` (removed by ``--overwrite``)."""


def _checkpoints(output: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(glob.escape(output), "checkpoint-*")))


def check_output(opts: TrainOptions) -> str | None:
    """Check ``--output`` before any work; returns the checkpoint ``--resume`` will continue.

    Raises:
        ValueError: the directory cannot be written, holds a run (without ``--resume`` or
            ``--overwrite``), or ``--resume`` finds no usable checkpoint.
    """
    output = opts.output
    check_writable_dir(output, "--output")
    if opts.resume and opts.overwrite:
        raise ValueError("--resume and --overwrite: give one (continue the run, or replace it)")
    if opts.resume:
        from mola.training.trainer import last_checkpoint

        checkpoint = last_checkpoint(output)
        if checkpoint is None:
            hint = " (--save-steps 0 keeps none)" if opts.save_steps == 0 else ""
            raise ValueError(f"--resume: no checkpoint-N directory in {output}{hint}")
        check_adapter_files(checkpoint)  # a damaged checkpoint fails before the model loads
        return checkpoint
    if opts.overwrite or not os.path.isdir(output):
        return None
    finished = [name for name in FINISHED if os.path.exists(os.path.join(output, name))]
    if finished:
        raise ValueError(
            f"--output {output} already holds a finished run ({finished[0]}); pass --overwrite "
            "to replace it, or choose another --output"
        )
    if _checkpoints(output):
        raise ValueError(
            f"--output {output} holds checkpoints of an unfinished run; pass --resume to "
            "continue it, --overwrite to start over, or choose another --output"
        )
    return None


def clear_previous_run(output: str) -> None:
    """Remove the outputs of an earlier run from ``output`` (``--overwrite``); other files stay."""
    for pattern in RUN_OUTPUTS:
        for path in glob.glob(os.path.join(glob.escape(output), pattern)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)


def notes(opts: TrainOptions) -> list[str]:
    """What the options silently imply, said once at the start."""
    lines = []
    if opts.data and not opts.eval_data and (opts.eval or opts.eval_before):
        lines.append(
            "--data without --eval-data: no evaluation (a data file has no test split); "
            "pass --eval-data FILE to evaluate"
        )
    if opts.save_steps == 0:
        lines.append(
            "--save-steps 0: no checkpoints while training, so a killed run cannot be "
            "--resume'd; pass --save-steps N to keep some"
        )
    return lines
