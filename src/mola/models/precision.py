"""The base model's precision: ``--dtype``, and a 4-bit or 8-bit base through bitsandbytes.

* ``--dtype auto|float32|bfloat16|float16`` is the dtype of the frozen base weights. ``auto``
  is bf16 on a CUDA GPU that supports it and fp32 elsewhere (a CPU). The adapter's parameters
  stay fp32 whatever the base (master weights); each :class:`~mola.core.layer.MolaLinear`
  casts its input to the adapter's dtype and the update back to the base output's dtype, as
  PEFT does. ``--bf16`` (autocast during training) is a different switch: it changes the
  compute dtype of the matmuls, not the stored weights; the two combine.
* ``--load-in-4bit`` (QLoRA: nf4, double quantization, compute in ``--dtype``) and
  ``--load-in-8bit`` (LLM.int8) quantize the frozen base on load through bitsandbytes, the
  optional extra ``pip install "mola-lora[quant]"``. The adapter is the same fp32 adapter;
  :func:`prepare_kbit_training` does the usual k-bit preparation before training.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Any

import torch
from torch import nn

from mola.data.datasets import DataError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
QUANT_EXTRA = 'pip install "mola-lora[quant]"'


def cuda_bf16() -> bool:
    """Whether a CUDA GPU that computes in bf16 is present."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype ``--dtype name`` means on ``device`` (``None``: wherever CUDA is).

    Raises:
        ValueError: an unknown name (one line naming ``--dtype``).
    """
    if name == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else True
        return torch.bfloat16 if on_cuda and cuda_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype: {name!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def quant_bits(load_in_4bit: bool, load_in_8bit: bool) -> int | None:
    """4, 8 or ``None`` (no quantization); checks that bitsandbytes is installed.

    Raises:
        ValueError: both flags, or bitsandbytes is missing (with the pip line).
    """
    if load_in_4bit and load_in_8bit:
        raise ValueError("--load-in-4bit and --load-in-8bit: choose one")
    if not (load_in_4bit or load_in_8bit):
        return None
    flag = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DataError(f"{flag}: needs the bitsandbytes package: {QUANT_EXTRA}")
    return 4 if load_in_4bit else 8


def quantization_config(bits: int, compute_dtype: torch.dtype) -> Any:
    """The transformers ``BitsAndBytesConfig`` for a 4-bit (QLoRA: nf4, double quantization,
    compute in ``compute_dtype``) or an 8-bit (LLM.int8) base."""
    from transformers import BitsAndBytesConfig

    quiet_bitsandbytes()
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def quiet_bitsandbytes() -> None:
    """Silence what bitsandbytes says in every normal run: the CPU backend's two lines about
    kernels-community kernels on import, and LLM.int8's per-call note on casting its input to
    fp16. Errors still show."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*kernels-community.*")
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")


def quantized_bits(model: nn.Module) -> int | None:
    """4 or 8 when ``model`` holds bitsandbytes layers, else ``None``."""
    for module in model.modules():
        name = type(module).__name__
        if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
            return 4
        if name == "Linear8bitLt":
            return 8
    return None


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, RMSNorm and the models' own ``*Norm`` classes)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(
        ("Norm", "RMSNorm", "LayerNorm")
    )


def prepare_kbit_training(model: nn.Module, gradient_checkpointing: bool) -> None:
    """The usual k-bit preparation (what PEFT's ``prepare_model_for_kbit_training`` does for a
    bitsandbytes base): freeze every base parameter, keep the norms in fp32, and with gradient
    checkpointing make the embedding output require grad so the checkpointed blocks backprop
    into the adapters."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if is_norm(module):
            for param in module.parameters(recurse=False):
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The full-precision weight ``(out, in)`` of an ``nn.Linear`` or a bitsandbytes layer."""
    name = type(module).__name__
    weight = module.weight
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if name == "Linear8bitLt":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        return weight.data.float() * scb.float().unsqueeze(1) / 127.0
    return weight.detach().float()
