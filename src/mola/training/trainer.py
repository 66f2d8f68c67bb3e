"""Training with the transformers ``Trainer``, subclassed only where MoLA differs.

``MolaTrainer`` changes these things: it logs the LM loss and the auxiliary load-balancing loss
separately, it saves the MoLA adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
instead of the whole model, and it resumes by loading that adapter back. Under data parallelism
(``torchrun`` or ``accelerate launch``, one process per device) each step is the step of one
process holding the whole global batch: the LM loss is the mean over the tokens of the global
batch (as transformers' ``average_tokens_across_devices`` does), the router losses are taken
over the global batch (see :func:`mola.routing.load_balancing_loss`), and the examples are drawn
in the same order whatever the number of processes. Under gradient accumulation the LM loss is
normalised over the tokens of the whole step; the router losses are taken per micro-batch and
averaged over the accumulation steps. Everything else (schedule and warmup, checkpoints, mixed
precision, activation checkpointing, TensorBoard/W&B/MLflow (``--report-to``), DDP) is the
Trainer's own.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from mola.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, is_adapter_name, load_adapter_weights
from mola.core.model import MolaModel
from mola.routing.adaptive_l1 import AdaptiveL1
from mola.training.options import TrainOptions
from mola.training.trackers import RunConfigCallback, parse_report_to
from mola.utils import distributed
from mola.utils.io import atomic_write, write_json


class EncodedDataset(Dataset):
    """A list of already tokenised examples (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, list[int]]:
        return self.rows[idx]


PARTIAL_DIR = ".partial"  # checkpoints being written, under the output directory


class NonFiniteLossError(ValueError):
    """The training loss or gradient norm became NaN or infinite (exit 2, one line)."""


def _publish(partial: str, final: str) -> None:
    """Rename a finished checkpoint directory into place (replacing an older one)."""
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(partial, final)


class GlobalLengthGroupedSampler(Sampler[int]):
    """The Trainer's ``group_by_length`` order, the same for any number of processes.

    The Trainer's own ``LengthGroupedSampler`` groups by the per-process batch and draws its
    permutation from the global RNG, which accelerate replaces, under several processes, with a
    fresh generator of its own: 2 processes x batch 2 then see other examples, in another order,
    than 1 process x batch 4. This sampler groups by the global batch (per-device batch x
    processes x accumulation) and draws from a generator seeded by ``seed + epoch``, so the
    sequence of global batches depends only on the data, the seed and the global batch size,
    and a resumed run replays the same epoch order. Accelerate then hands consecutive
    per-device batches of it to consecutive processes.
    """

    def __init__(self, lengths: list[int], global_batch: int, seed: int) -> None:
        self.lengths = lengths
        self.global_batch = global_batch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.global_batch, generator=rng))


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of predicted tokens: labels after the first position that are not -100."""
    return labels[..., 1:].ne(-100).sum()


class AdaptiveL1Callback(TrainerCallback):
    """Updates ReMoE's adaptive L1 weight (:mod:`mola.routing.adaptive_l1`) after each step."""

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.schedule.step()
        return control


class MolaTrainer(Trainer):
    """``Trainer`` that logs ``lm_loss``/``aux_loss`` and saves only the MoLA adapter."""

    # compute_loss returns a loss already normalised over the accumulated global batch
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # MolaModel returns a mean; compute_loss rescales
        names = getattr(self.accelerator.unwrap_model(self.model), "loss_names", ["aux_loss"])
        self._sums = dict.fromkeys(["lm_loss", *names], 0.0)  # each router loss logged apart
        self._log_span = 0
        self._staging: str | None = None
        self._pending_checkpoint: str | None = None  # saved, not yet followed by a finite loss
        self._good_checkpoint: str | None = None
        self._l1_schedule = getattr(self.accelerator.unwrap_model(self.model), "l1_schedule", None)
        if self._l1_schedule is not None:
            self.add_callback(AdaptiveL1Callback(self._l1_schedule))

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [len(row["input_ids"]) for row in dataset]
        args = self.args
        global_batch = args.per_device_train_batch_size * args.world_size
        global_batch *= args.gradient_accumulation_steps
        return GlobalLengthGroupedSampler(lengths, global_batch, args.seed)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Predicted tokens in this optimizer step's batches, summed over all processes."""
        local = sum(count_targets(batch["labels"]) for batch in batch_samples)
        local = torch.as_tensor(local, device=device, dtype=torch.float32)
        return distributed.all_reduce_sum(local).clamp_min(1)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The micro-batch's share of the global step loss.

        ``lm_loss`` (a mean over this micro-batch's tokens) is turned into a sum over them
        divided by the tokens of the whole step (all micro-batches, all processes), times the
        number of processes because DDP averages the gradients; the router losses (already over
        the global batch) are divided by the accumulation steps. Summed over micro-batches and
        averaged over processes, that is one process's loss over the global batch.
        """
        outputs = model(**inputs)
        loss = outputs.loss
        if model.training and num_items_in_batch is not None and "lm_loss" in outputs:
            lm = outputs["lm_loss"]
            local = count_targets(inputs["labels"])
            share = local.to(lm.dtype) / num_items_in_batch
            lm_part = lm * share if int(local) > 0 else lm.nan_to_num(0.0) * 0.0
            router_part = (loss - lm) / self.current_gradient_accumulation_steps
            loss = self.args.world_size * lm_part + router_part
            self._sums["lm_loss"] += float(lm_part.detach())
            for name in self._sums:  # aux_loss and each router loss, logged apart
                value = outputs.get(name) if name != "lm_loss" else None
                if value is not None:
                    self._sums[name] += (
                        float(value.detach()) / self.current_gradient_accumulation_steps
                    )
        return (loss, outputs) if return_outputs else loss

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        self._log_span = self.state.global_step - self._globalstep_last_logged
        super()._maybe_log_save_evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``lm_loss`` and ``aux_loss``: per-step means over the global batch."""
        if "loss" in logs and self._log_span > 0:
            sums = torch.tensor(list(self._sums.values()), dtype=torch.float64)
            lm = distributed.all_reduce_sum(sums.to(self.args.device))[0]  # per-process shares
            logs["lm_loss"] = round(float(lm) / self._log_span, 6)
            for name, total in self._sums.items():  # router losses: already global
                if name != "lm_loss":
                    logs[name] = round(total / self._log_span, 6)
            self._sums = dict.fromkeys(self._sums, 0.0)
            self._log_span = 0
            schedule = self._l1_schedule
            if schedule is not None and schedule.sparsity is not None:  # the last step's
                logs["l1_loss_coef"] = schedule.applied
                logs["l1_sparsity"] = round(schedule.sparsity, 6)
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None or not self.is_fsdp_enabled:
            model.save_pretrained(output_dir)
            return
        # FSDP: the parameters are shards; the Trainer gathered the full state dict for us
        tensors = {
            name.removeprefix("base_model."): t.detach().to("cpu").contiguous()
            for name, t in state_dict.items()
            if is_adapter_name(name)
        }
        os.makedirs(output_dir, exist_ok=True)
        atomic_write(os.path.join(output_dir, WEIGHTS_NAME), lambda p: save_file(tensors, p))
        write_json(os.path.join(output_dir, CONFIG_NAME), model.adapter_config())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        load_adapter_weights(resume_from_checkpoint, target.base_model)
        if self._l1_schedule is not None:  # the adaptive L1 weight where the run left it
            path = os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)
            with contextlib.suppress(OSError, ValueError):
                saved = json.loads(Path(path).read_text()).get("stateful_callbacks", {})
                if AdaptiveL1.STATE_KEY in saved:
                    self._l1_schedule.load_state(saved[AdaptiveL1.STATE_KEY])

    # -- checkpoints: written whole or not at all ---------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, written into ``<output>/.partial/`` and then renamed.

        Every process writes its part (rank 0: adapter, optimizer, scheduler, trainer state;
        each rank: its RNG state); after a barrier rank 0 renames the finished directory to
        ``checkpoint-N``. A kill at any moment leaves either a complete ``checkpoint-N`` or
        none, so ``--resume`` never picks a half-written one. On machines without a shared
        disk each machine's local rank 0 publishes its own copy.
        """
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, PARTIAL_DIR)
        if self.is_local_process_zero():
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
        distributed.barrier()
        self._staging = staging
        if self._l1_schedule is not None:  # saved in trainer_state.json with the step
            self.state.stateful_callbacks[AdaptiveL1.STATE_KEY] = self._l1_schedule.state()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        distributed.barrier()
        if self.is_world_process_zero():
            _publish(os.path.join(staging, name), os.path.join(run_dir, name))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        distributed.barrier()
        if self.is_local_process_zero():
            if os.path.isdir(os.path.join(staging, name)):  # a node-local disk
                _publish(os.path.join(staging, name), os.path.join(run_dir, name))
            with contextlib.suppress(OSError):
                os.rmdir(staging)  # only when empty
        self._pending_checkpoint = os.path.join(run_dir, name)

    # -- non-finite loss guard ----------------------------------------------------------------
    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None):
        """The Trainer's step, stopped on a NaN/inf loss on any process before the update."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = not bool(torch.isfinite(loss).all())
        if distributed.any_process(bad, loss.device):
            self._stop_non_finite("loss", float(loss) if bad else float("nan"))
        elif self._pending_checkpoint:  # its weights gave a finite loss: a good checkpoint
            self._good_checkpoint, self._pending_checkpoint = self._pending_checkpoint, None
        return loss

    def _clip_grad_norm(self, model: Any) -> Any:
        """Also stops on a NaN/inf gradient norm (the same on every process), before the update.

        Not with ``--fp16``, whose loss scaler expects overflowing steps and skips them itself.
        """
        norm = super()._clip_grad_norm(model)
        if not self.args.fp16 and norm is not None and not math.isfinite(float(norm)):
            self._stop_non_finite("gradient norm", float(norm))
        return norm

    def _stop_non_finite(self, what: str, value: float) -> None:
        step = self.state.global_step + 1
        pending = self._pending_checkpoint
        if pending and self.is_world_process_zero() and os.path.isdir(pending):
            shutil.rmtree(pending)  # saved after the last update: its weights give this loss
        distributed.barrier()
        good = self._good_checkpoint
        if not self.is_world_process_zero():
            raise SystemExit(2)  # rank 0 reports
        where = f"last good checkpoint: {good}" if good else "no good checkpoint was saved"
        raise NonFiniteLossError(
            f"non-finite {what} ({value}) at step {step}; training stopped before that update, "
            f"{where} (lower --lr, or --resume from it)"
        )


def training_arguments(opts: TrainOptions, num_examples: int) -> TrainingArguments:
    """``TrainingArguments`` for ``opts``, written for transformers 4.45+ and 5.x alike."""
    accepted = inspect.signature(TrainingArguments.__init__).parameters
    per_epoch = math.ceil(
        num_examples / (opts.batch_size * opts.grad_accum * distributed.world_size())
    )
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
        "use_cpu": not cuda,  # gloo process group under torchrun on CPU (else not distributed)
        **mixed_precision(opts, cuda),
        "dataloader_pin_memory": cuda,
        "remove_unused_columns": False,
        "report_to": parse_report_to(opts.report_to),
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


def mixed_precision(opts: TrainOptions, cuda: bool) -> dict[str, bool]:
    """``bf16``/``fp16`` for the Trainer: autocast compute, fp32 master weights and optimizer.

    The adapter's parameters stay fp32 (the Trainer autocasts, it does not cast the model);
    routers take their softmax and the router losses in fp32 whatever the autocast dtype.

    Raises:
        ValueError: both asked for, or ``--fp16`` without a CUDA GPU.
    """
    if opts.bf16 and opts.fp16:
        raise ValueError("--bf16 and --fp16: choose one")
    if opts.fp16 and not cuda:
        raise ValueError("--fp16: needs a CUDA GPU (its loss scaler is CUDA-only); use --bf16")
    bf16 = opts.bf16 if opts.bf16 is not None else cuda and not opts.fp16
    if bf16 and cuda and not torch.cuda.is_bf16_supported():
        if opts.bf16:
            raise ValueError("--bf16: this GPU does not support bf16; use --fp16")
        bf16 = False
    return {"bf16": bool(bf16), "fp16": opts.fp16}


def start_line(args: TrainingArguments) -> str:
    """One line: processes, backend, device, precision and the global batch they make."""
    n = args.world_size
    per, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    where = (
        f"data-parallel on {n} processes ({distributed.backend()}, {args.device.type}, {precision})"
        if n > 1
        else f"1 process ({args.device.type}, {precision})"
    )
    procs = f"{n} process{'es' if n > 1 else ''}"
    steps = f"{accum} accumulation step{'s' if accum > 1 else ''}"
    return (
        f"mola: training {where}; global batch {per * n * accum} = {per} per device "
        f"x {procs} x {steps}"
    )


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
    if args.report_to:  # the resolved options as each tracker's run config
        callbacks = trainer.callback_handler.callbacks
        trainer.add_callback(RunConfigCallback(opts.to_dict(), list(args.report_to), callbacks))
    for callback in trainer.callback_handler.callbacks:  # TensorBoard: <output>/logs, not runs/
        if type(callback).__name__ == "TensorBoardCallback" and not callback.logging_dir:
            callback.logging_dir = os.path.join(opts.output, "logs")
    if trainer.is_world_process_zero():
        print(start_line(trainer.args))
        asked_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if asked_fsdp and not trainer.is_fsdp_enabled:
            print("mola: warning: accelerate runs FSDP on GPUs only; this run is plain DDP")
    resume = None
    if opts.resume:
        resume = last_checkpoint(opts.output)
        if resume is None:
            raise ValueError(f"--resume: no checkpoint-N directory in {opts.output}")
        trainer._good_checkpoint = resume
    if trainer.is_world_process_zero():  # left by a run killed while writing a checkpoint
        shutil.rmtree(os.path.join(opts.output, PARTIAL_DIR), ignore_errors=True)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(opts.output)
    return {
        "train": dict(result.metrics),
        "log_history": trainer.state.log_history,
        "resumed_from": resume,
    }
