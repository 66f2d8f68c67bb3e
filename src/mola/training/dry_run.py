"""``mola train ... --dry-run``: the whole configuration resolved on the ``meta`` device, with the
trainable parameters per layer group and a memory estimate per device, before anything runs.

Nothing is loaded (only the model's ``config.json``, or a built-in model's GGUF header) and
nothing is written. The estimate (:func:`estimate_memory`) adds up, per device:

* **base weights** at the chosen dtype, or 4-bit (nf4 with double quantization: 4.127 bits per
  weight) / 8-bit (1 byte plus an fp32 scale per row) for the linear layers bitsandbytes
  quantizes (all but the output head);
* **adapters + optimizer**: the trainable parameters in fp32 with their gradient and AdamW's two
  moments (16 bytes per parameter);
* **activations** for ``batch_size x cutoff_len`` tokens, every position labelled (an upper
  bound): per token and decoder layer, what backward keeps of a Llama-style block (the two
  RMSNorms' inputs and outputs, q and the GQA-expanded k and v, the attention output, the MLP's
  four intermediate tensors: ``11 h + 4 i`` values) plus each adapted module's expert
  activations, and the head's logits (three copies: logits, log-softmax, their gradient); twice
  that (:data:`BACKWARD_FACTOR`) for the gradients backward allocates while it frees them. With
  gradient checkpointing only each block's input is kept, plus one block recomputed at a time.

It is an estimate of the tensors, not of the allocator: CUDA's caching allocator and the CPU's
malloc add their own slack (tested on the default model on the CPU within the tolerance
:data:`mola`'s tests state).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mola.training.options import TrainOptions

ADAM_BYTES = 16
"""fp32 parameter + fp32 gradient + AdamW's two fp32 moments."""
BACKWARD_FACTOR = 2
"""The peak holds the activations saved for backward and, while backward runs, their gradients
(freed layer by layer, but not returned to the system at once): twice the saved tensors. Measured
on the default model on the CPU (fp32, 128 and 512 tokens, with and without checkpointing): the
peak resident memory is 0.95-1.09 times the estimate built with this factor."""
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
"""nf4 with double quantization: 4 bits, an 8-bit absmax per 64 weights, an fp32 scale per 256
absmax values."""


@dataclass
class MemoryEstimate:
    """Bytes per device."""

    weights: int
    adapters: int
    activations: int
    activations_checkpointed: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.activations

    @property
    def total_checkpointed(self) -> int:
        return self.weights + self.adapters + self.activations_checkpointed

    def fsdp(self, gpus: int, checkpointing: bool) -> int:
        """Per GPU under FSDP over ``gpus`` GPUs (weights and adapter state sharded)."""
        act = self.activations_checkpointed if checkpointing else self.activations
        return (self.weights + self.adapters) // gpus + act


def model_config(name_or_path: str, revision: str | None = None) -> Any:
    """The transformers config of a local directory, a built-in model or a Hub id, reading no
    weights."""
    from transformers import AutoConfig

    from mola.data.datasets import DataError
    from mola.models.hub import (
        BUILTIN_MODELS,
        LOAD_ERRORS,
        _package_dir,
        _reason,
        cache_dir,
        check_model_dir,
    )
    from mola.models.hub_ids import hub_config_file, is_hub_id

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            check_model_dir(path)  # its one-line error
        try:  # the config alone: a directory of config.json without weights is enough here
            return AutoConfig.from_pretrained(path)
        except LOAD_ERRORS as err:
            raise DataError(f"model {path}: cannot read config.json ({_reason(err)})") from None
    if name_or_path in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name_or_path]
        cached = cache_dir() / spec.cache_name
        if (cached / "config.json").is_file():
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(_package_dir(spec), gguf_file=spec.gguf_file)
    if is_hub_id(name_or_path):
        return AutoConfig.from_pretrained(hub_config_file(name_or_path, revision).parent)
    raise DataError(
        f"unknown model '{name_or_path}': not a local directory, a built-in name "
        f"({', '.join(BUILTIN_MODELS)}) or a Hub id ORG/NAME"
    )


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_memory(
    model: Any,
    weight_dtype: torch.dtype,
    bits: int | None,
    compute_dtype: torch.dtype,
    tokens: int,
) -> MemoryEstimate:
    """The memory estimate of training ``model`` (a :class:`~mola.core.model.MolaModel`, on
    any device, ``meta`` included) on ``tokens`` tokens per step (module docstring)."""
    from mola.core.injection import find_decoder_layers

    base = model.base_model
    head = base.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    weights = 0
    seen: set[int] = set()
    for module_name, module in base.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or model_is_adapter(f"{module_name}.{name}"):
                continue
            seen.add(id(param))
            quantized = (
                bits is not None
                and isinstance(module, torch.nn.Linear)
                and name == "weight"
                and param is not head_weight
            )
            if quantized and bits == 4:
                weights += int(param.numel() * NF4_BITS / 8)
            elif quantized:
                weights += param.numel() + 4 * param.shape[0]
            else:
                weights += param.numel() * _bytes(weight_dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    h, i = text.hidden_size, getattr(text, "intermediate_size", 4 * text.hidden_size)
    vocab = text.vocab_size
    blocks = find_decoder_layers(base)[1]
    e = _bytes(compute_dtype)
    per_layer = (11 * h + 4 * i) * e
    experts = [0] * len(blocks)
    for _, layer in model.mola_layers():
        k = layer.experts.down_weight().shape[0]  # E*r (or r / R): h and its gated copy
        experts[layer.layer_idx or 0] += (2 * k + 2 * layer.num_experts) * 4
    logits = 3 * vocab * 4
    saved = tokens * (per_layer * len(blocks) + sum(experts) + logits)
    saved_checkpointed = tokens * (
        h * e * len(blocks) + per_layer + max(experts, default=0) + logits
    )
    full, checkpointed = BACKWARD_FACTOR * saved, BACKWARD_FACTOR * saved_checkpointed
    return MemoryEstimate(weights, trainable * ADAM_BYTES, full, checkpointed)


def model_is_adapter(name: str) -> bool:
    from mola.core.checkpoint import is_adapter_name

    return is_adapter_name(name)


def human(n: float) -> str:
    """Bytes as ``1.23 GB`` / ``456 MB`` (decimal units)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def layer_groups(model: Any) -> list[tuple[str, int, int, int | None, int]]:
    """``(layers, experts, r, top_k, trainable params)`` for runs of consecutive decoder layers
    with the same allocation."""
    from mola.core.injection import find_decoder_layers

    prefix, blocks = find_decoder_layers(model.base_model)
    per_layer = [0] * len(blocks)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\." if prefix else r"^(\d+)\.")
    for name, param in model.base_model.named_parameters():
        found = pattern.match(name)
        if param.requires_grad and found:
            per_layer[int(found.group(1))] += param.numel()
    alloc = model.allocation
    keys = list(zip(alloc["num_experts"], alloc["r"], alloc["top_k"], strict=True))
    groups: list[tuple[str, int, int, int | None, int]] = []
    start = 0
    for idx in range(1, len(keys) + 1):
        if idx == len(keys) or keys[idx] != keys[start]:
            span = f"{start}" if idx - 1 == start else f"{start}-{idx - 1}"
            experts, r, top_k = keys[start]
            groups.append((span, experts, r, top_k, sum(per_layer[start:idx])))
            start = idx
    return groups


def dry_run(opts: TrainOptions, show: bool = True) -> dict[str, Any]:
    """Resolve ``opts`` on the meta device; print the report (``show``) and return it."""
    from transformers import AutoModelForCausalLM

    from mola.core.model import MolaModel, get_mola_model
    from mola.models.placement import resolve_device
    from mola.models.precision import quant_bits, resolve_dtype
    from mola.training.pipeline import _check_fits
    from mola.training.trainer import mixed_precision
    from mola.utils.tables import table

    config = model_config(opts.model, opts.revision)
    device = resolve_device("auto")
    dtype = resolve_dtype(opts.dtype, device)
    bits = quant_bits(opts.load_in_4bit, opts.load_in_8bit)
    precision = mixed_precision(opts, device.type == "cuda")
    compute = torch.bfloat16 if precision["bf16"] else torch.float16 if precision["fp16"] else dtype
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if opts.init_from:
        from mola.core.config import MolaConfig

        mola_config = MolaConfig.load(opts.init_from)
    else:
        mola_config = opts.mola_config()
    if opts.allocation:
        from mola.core.allocation_file import check_fits
        from mola.core.injection import find_decoder_layers

        blocks = len(find_decoder_layers(base)[1])
        check_fits({"num_experts": mola_config.num_experts}, blocks, opts.allocation)
    _check_fits(base, mola_config)
    model: MolaModel = get_mola_model(base, mola_config)
    trainable, total = model.num_parameters_split()
    tokens = opts.batch_size * opts.cutoff_len
    memory = estimate_memory(model, dtype, bits, compute, tokens)
    groups = layer_groups(model)
    base_kind = f"{bits}-bit" if bits else str(dtype).removeprefix("torch.")
    autocast = (
        " + bf16 autocast" if precision["bf16"] else " + fp16 autocast" if precision["fp16"] else ""
    )
    report = {
        "model": opts.model,
        "architecture": type(base).__name__,
        "decoder_layers": len(model.allocation["num_experts"]),
        "base_params": total - trainable,
        "trainable_params": trainable,
        "layer_groups": [
            {"layers": g[0], "experts": g[1], "r": g[2], "top_k": g[3], "trainable_params": g[4]}
            for g in groups
        ],
        "device": device.type,
        "base": base_kind,
        "compute": str(compute).removeprefix("torch.") + autocast,
        "tokens_per_step": tokens,
        "memory_bytes": {
            "base_weights": memory.weights,
            "adapters_grads_adamw": memory.adapters,
            "activations": memory.activations,
            "activations_gradient_checkpointing": memory.activations_checkpointed,
            "total": memory.total,
            "total_gradient_checkpointing": memory.total_checkpointed,
        },
    }
    if show:
        print(
            f"mola: dry run (no weights loaded, nothing written): {opts.model}, "
            f"{report['architecture']}, {report['decoder_layers']} decoder layers, "
            f"{(total - trainable) / 1e6:,.1f}M base parameters"
        )
        rows = [[g[0], g[1], g[2], g[3] if g[3] is not None else "-", f"{g[4]:,d}"] for g in groups]
        print(table(["layers", "experts", "r", "top-k", "trainable params"], rows))
        print(f"trainable params {trainable:,d} ({100 * trainable / max(total, 1):.2f}% of all)")
        checkpointing = " (on)" if opts.gradient_checkpointing else ""
        print(
            f"memory estimate per device ({device.type}; base {base_kind}, compute "
            f"{report['compute']}; batch {opts.batch_size} x {opts.cutoff_len} tokens):"
        )
        lines = [
            ["base weights", human(memory.weights)],
            ["adapters + grads + AdamW (fp32)", human(memory.adapters)],
            ["activations", human(memory.activations)],
            [f"activations, checkpointing{checkpointing}", human(memory.activations_checkpointed)],
            ["total", human(memory.total)],
            [f"total, checkpointing{checkpointing}", human(memory.total_checkpointed)],
        ]  # fmt: skip
        print(table(["", "bytes"], lines))
        shards = [
            f"{n} GPUs {human(memory.fsdp(n, opts.gradient_checkpointing))}" for n in (2, 4, 8)
        ]
        print(
            "FSDP shards the weights and the adapter state over the GPUs, not the activations: "
            + ", ".join(shards)
            + " per GPU"
        )
    return {"dry_run": report, "main_process": show}
