"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only the adapter's tensors are written (names with a ``lora_`` part or a ``router`` part), under
the base model's own module names. Loading reads JSON and safetensors only, never pickle.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mola.utils.io import atomic_write, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name belongs to the adapter (``lora_*`` or ``router``)."""
    return any(part.startswith("lora_") or part == "router" for part in name.split("."))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_name(n)}


def save_adapter(directory: str, config: dict[str, Any], model: nn.Module) -> None:
    """Write the adapter's config and tensors into ``directory``, each file atomically."""
    os.makedirs(directory, exist_ok=True)
    tensors = {n: t.to("cpu").contiguous() for n, t in adapter_state_dict(model).items()}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(tensors, p))
    write_json(os.path.join(directory, CONFIG_NAME), config)


def read_adapter_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"adapter: {path} not found; pass a directory written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"adapter: {path} is not valid JSON ({err.msg})") from None


def load_adapter_weights(directory: str, model: nn.Module) -> None:
    """Copy the saved tensors into ``model``; every adapter tensor must be present, shapes equal."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"adapter: {path} not found")
    saved = load_file(path)
    own = dict(model.named_parameters())
    expected = {n for n in own if is_adapter_name(n)}
    missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
    if missing or unexpected:
        raise ValueError(
            f"adapter does not match the base model: {len(missing)} missing tensor(s) "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            param = own[name]
            if param.shape != tensor.shape:
                raise ValueError(
                    f"adapter does not match the base model: {name} has shape "
                    f"{tuple(tensor.shape)} in the checkpoint, {tuple(param.shape)} in the model"
                )
            param.copy_(tensor.to(param.dtype))
