"""Training with the transformers ``Trainer``, subclassed only where MoLA differs.

``MolaTrainer`` changes three things: it logs the LM loss and the auxiliary load-balancing loss
separately, it saves the MoLA adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
instead of the whole model, and it resumes by loading that adapter back. Everything else
(accumulation, schedule and warmup, checkpoints, mixed precision, checkpointing, TensorBoard,
``accelerate launch``) is the Trainer's own.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from mola.core.checkpoint import load_adapter_weights
from mola.core.model import MolaModel
from mola.training.options import TrainOptions


class EncodedDataset(Dataset):
    """A list of already tokenised examples (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, list[int]]:
        return self.rows[idx]


class MolaTrainer(Trainer):
    """``Trainer`` that logs ``lm_loss``/``aux_loss`` and saves only the MoLA adapter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # mean loss per micro-batch; Trainer averages
        self._sums = {"lm_loss": 0.0, "aux_loss": 0.0}
        self._count = 0

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        outputs = model(**inputs)
        if model.training:
            for key in self._sums:
                value = outputs.get(key)
                if value is not None:
                    self._sums[key] += float(value.detach())
            self._count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._count:
            for key, total in self._sums.items():
                logs[key] = round(total / self._count, 6)
            self._sums = dict.fromkeys(self._sums, 0.0)
            self._count = 0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        load_adapter_weights(resume_from_checkpoint, target.base_model)


def training_arguments(opts: TrainOptions, num_examples: int) -> TrainingArguments:
    """``TrainingArguments`` for ``opts``, written for transformers 4.45+ and 5.x alike."""
    accepted = inspect.signature(TrainingArguments.__init__).parameters
    per_epoch = math.ceil(num_examples / (opts.batch_size * opts.grad_accum))
    total = opts.max_steps if opts.max_steps > 0 else math.ceil(per_epoch * opts.epochs)
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "output_dir": opts.output,
        "learning_rate": opts.lr,
        "num_train_epochs": opts.epochs,
        "max_steps": opts.max_steps,
        "per_device_train_batch_size": opts.batch_size,
        "gradient_accumulation_steps": opts.grad_accum,
        "warmup_steps": int(round(opts.warmup_ratio * total)),
        "lr_scheduler_type": opts.scheduler,
        "weight_decay": opts.weight_decay,
        "logging_steps": opts.logging_steps,
        "save_strategy": "steps" if opts.save_steps > 0 else "no",
        "save_steps": max(opts.save_steps, 1),
        "save_total_limit": 2,
        "seed": opts.seed,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "dataloader_pin_memory": cuda,
        "remove_unused_columns": False,
        "report_to": ["tensorboard"] if importlib.util.find_spec("tensorboard") else [],
        "disable_tqdm": not opts.progress,
        "dataloader_num_workers": 0,
    }
    if "train_sampling_strategy" in accepted:  # transformers 5
        kwargs["train_sampling_strategy"] = "group_by_length"
    else:
        kwargs["group_by_length"] = True
    if "activation_checkpointing" in accepted:  # transformers 5 name
        kwargs["activation_checkpointing"] = opts.gradient_checkpointing
    else:
        kwargs["gradient_checkpointing"] = opts.gradient_checkpointing
    if "logging_dir" in accepted:
        kwargs["logging_dir"] = os.path.join(opts.output, "logs")
    if "eval_strategy" in accepted:
        kwargs["eval_strategy"] = "no"
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in accepted})


def last_checkpoint(output: str) -> str | None:
    """The newest ``checkpoint-N`` directory under ``output`` holding an adapter."""
    if not os.path.isdir(output):
        return None
    steps = [
        (int(name.split("-", 1)[1]), name)
        for name in os.listdir(output)
        if name.startswith("checkpoint-")
        and name.split("-", 1)[1].isdigit()
        and os.path.isfile(os.path.join(output, name, "adapter_model.safetensors"))
    ]
    return os.path.join(output, max(steps)[1]) if steps else None


def train(
    model: MolaModel, rows: list[dict[str, list[int]]], collator: Any, opts: TrainOptions
) -> dict[str, Any]:
    """Fine-tune ``model`` on encoded ``rows``; returns the Trainer's train metrics + history."""
    args = training_arguments(opts, len(rows))
    trainer = MolaTrainer(
        model=model, args=args, train_dataset=EncodedDataset(rows), data_collator=collator
    )
    resume = None
    if opts.resume:
        resume = last_checkpoint(opts.output)
        if resume is None:
            raise ValueError(f"--resume: no checkpoint-N directory in {opts.output}")
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(opts.output)
    return {
        "train": dict(result.metrics),
        "log_history": trainer.state.log_history,
        "resumed_from": resume,
    }
