"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only the adapter's tensors are written (names with a ``lora_`` part or a ``router`` part), under
the base model's own module names. Loading reads JSON and safetensors only, never pickle.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mola.core.config import CONFIG_NAME, read_adapter_config  # noqa: F401 (re-exported)
from mola.utils.io import atomic_write, write_json

WEIGHTS_NAME = "adapter_model.safetensors"


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name belongs to the adapter (``lora_*`` or ``router``)."""
    return any(part.startswith("lora_") or part == "router" for part in name.split("."))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's parameters and buffers (FlyLoRA's frozen ``A``, balancing biases) by name."""
    tensors = {n: p for n, p in model.named_parameters() if is_adapter_name(n)}
    tensors.update((n, b) for n, b in model.named_buffers() if is_adapter_name(n))
    return tensors


def saved_name(name: str) -> str:
    """The checkpoint name of an adapter tensor: the layer's ``experts`` submodule is a run-time
    detail, so ``<module>.experts.lora_A`` is saved as ``<module>.lora_A`` (as mola <= 0.1 did)."""
    return name.replace(".experts.", ".")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their checkpoint names (:func:`saved_name`)."""
    return {saved_name(n): t.detach() for n, t in adapter_tensors(model).items()}


def _current_name(name: str, own: dict[str, torch.Tensor]) -> str:
    """The model's name of a checkpoint tensor (``<module>.lora_A`` -> ``<module>.experts...``)."""
    if name in own:
        return name
    head, _, leaf = name.rpartition(".")
    moved = f"{head}.experts.{leaf}"
    return moved if moved in own else name


def save_adapter(directory: str, config: dict[str, Any], model: nn.Module) -> None:
    """Write the adapter's config and tensors into ``directory``, each file atomically."""
    os.makedirs(directory, exist_ok=True)
    tensors = {n: t.to("cpu").contiguous() for n, t in adapter_state_dict(model).items()}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(tensors, p))
    write_json(os.path.join(directory, CONFIG_NAME), config)


def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` (safetensors only, never pickle).

    Raises:
        ValueError: the file is missing, truncated or not a safetensors file.
    """
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"adapter: {path} not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"adapter: {path} is not a readable safetensors file ({reason}); it is truncated "
            "or damaged: save or train the adapter again"
        ) from None


def check_adapter_files(directory: str) -> dict[str, Any]:
    """Validate an adapter directory before loading any model: its config and the header of
    its weights file. Returns the config.

    Raises:
        ValueError: as :func:`read_adapter_config` and :func:`read_adapter_weights`.
    """
    data = read_adapter_config(directory)
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"adapter: {path} not found")
    try:
        with safe_open(path, framework="pt") as fh:
            names = list(fh.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"adapter: {path} is not a readable safetensors file ({reason}); it is truncated "
            "or damaged: save or train the adapter again"
        ) from None
    foreign = [n for n in names if not is_adapter_name(n)]
    if foreign:
        raise ValueError(
            f"adapter: {path} holds {len(foreign)} tensor(s) that are not adapter weights, "
            f"e.g. {foreign[0]!r}; a mola adapter holds only lora_* and router tensors"
        )
    return data


def load_adapter_weights(directory: str, model: nn.Module) -> None:
    """Copy the saved tensors into ``model``; every adapter tensor must be present, shapes equal.

    Raises:
        ValueError: the file is unreadable, or tensors are missing, unexpected or misshaped
            (the message names the file).
    """
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    own = adapter_tensors(model)
    saved = {_current_name(n, own): t for n, t in read_adapter_weights(directory).items()}
    for name in [n for n in saved if n not in own and n.endswith(".router.weight")]:
        if name.removesuffix("router.weight") + "experts.lora_A" in own:
            del saved[name]  # mola <= 0.1 gave a single expert a router; it routes nothing
    expected = set(own)
    missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
    if missing or unexpected:
        raise ValueError(
            f"adapter: {path} does not match the base model: {len(missing)} missing tensor(s) "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    for name, tensor in saved.items():
        param = own[name]
        if param.shape != tensor.shape:
            raise ValueError(
                f"adapter: {path} does not match the base model: {name} has shape "
                f"{tuple(tensor.shape)} in the file, {tuple(param.shape)} in the model"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"adapter: {path}: {name} has dtype {tensor.dtype}, not a float")
    with torch.no_grad():
        for name, tensor in saved.items():
            own[name].copy_(tensor.to(own[name].dtype))
