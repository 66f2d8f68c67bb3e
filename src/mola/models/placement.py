"""How and where a command loads its base model: ``--revision``, ``--dtype``, ``--load-in-4bit``
/ ``--load-in-8bit``, ``--device`` and ``--device-map``.

``--device auto|cpu|cuda|cuda:N|mps`` puts the whole model on one device (``auto``: CUDA when
present, else the CPU). ``--device-map auto`` instead spreads a model larger than one GPU over
every GPU (then CPU memory) with accelerate's big-model loading; inputs go to the device of the
model's first parameter (the embedding), the layers move activations on by themselves.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from mola.models.precision import DTYPE_CHOICES, quant_bits, resolve_dtype

DEVICE_MAPS = ("auto",)


@dataclass(frozen=True)
class LoadOptions:
    """Loading options shared by every command that loads a base model."""

    revision: str | None = None
    dtype: str = "auto"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    device: str = "auto"
    device_map: str | None = None

    def check(self) -> None:
        """Every option, one line each.

        Raises:
            ValueError: an unknown dtype or device, a device that is not there, both
                quantizations, bitsandbytes missing, or ``--device`` with ``--device-map``.
        """
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ValueError(f"--device-map: {self.device_map!r} is not one of auto")
        if self.device_map is not None and self.device not in ("auto", None):
            raise ValueError("--device and --device-map: choose one")
        resolve_dtype(self.dtype)
        resolve_device(self.device)
        quant_bits(self.load_in_4bit, self.load_in_8bit)


def resolve_device(name: str | None) -> torch.device:
    """The device ``--device name`` means; ``auto`` (or ``None``) is CUDA when present.

    Raises:
        ValueError: an unreadable name, or a device that this machine does not have.
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device: cannot read {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name} requested but CUDA is not available here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device: {name} requested but there are {count} CUDA devices")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device: {name} requested but MPS is not available here")
    elif device.type != "cpu":
        raise ValueError(f"--device: {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return device


def load_kwargs(options: LoadOptions) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``options``: ``dtype``, ``revision``,
    ``quantization_config`` and ``device_map``."""
    from mola.models.precision import quantization_config

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device if options.device_map is None else None)
    kwargs: dict[str, Any] = {"dtype": dtype}
    bits = quant_bits(options.load_in_4bit, options.load_in_8bit)
    if bits is not None:
        kwargs["quantization_config"] = quantization_config(bits, dtype)
    if options.device_map is not None:
        kwargs["device_map"] = options.device_map
    elif device.type != "cpu" or bits is not None:  # bitsandbytes quantizes while placing
        kwargs["device_map"] = {"": device}
    return kwargs


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its first parameter (its embedding)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def add_load_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """``--revision``, ``--dtype``, ``--load-in-4bit``, ``--load-in-8bit`` and, for the
    inference commands, ``--device`` and ``--device-map``."""
    parser.add_argument("--revision", help="Hub branch, tag or commit of --model (default main)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="base weights dtype (auto: bf16 on a bf16 GPU, else fp32; adapters stay fp32)",
    )
    parser.add_argument(
        "--load-in-4bit", action="store_true", help="4-bit nf4 base (bitsandbytes; QLoRA)"
    )
    parser.add_argument("--load-in-8bit", action="store_true", help="8-bit base (bitsandbytes)")
    if device:
        parser.add_argument(
            "--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps"
        )
        parser.add_argument(
            "--device-map",
            choices=DEVICE_MAPS,
            help="auto: spread a model larger than one GPU over all GPUs (accelerate)",
        )


def load_options_from_args(args: argparse.Namespace) -> LoadOptions:
    """The :class:`LoadOptions` of parsed arguments, checked."""
    options = LoadOptions(
        revision=getattr(args, "revision", None),
        dtype=getattr(args, "dtype", None) or "auto",
        load_in_4bit=bool(getattr(args, "load_in_4bit", False)),
        load_in_8bit=bool(getattr(args, "load_in_8bit", False)),
        device=getattr(args, "device", None) or "auto",
        device_map=getattr(args, "device_map", None),
    )
    options.check()
    return options
