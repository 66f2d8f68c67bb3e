"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only the adapter's tensors are written (names with a ``lora_`` part or a ``router`` part), under
the base model's own module names. Loading reads JSON and safetensors only, never pickle.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mola.utils.io import atomic_write, write_json

CONFIG_NAME = "adapter_config.json"
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


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _check_allocation(allocation: Any, path: str) -> None:
    keys = ("num_experts", "top_k", "r")
    if not isinstance(allocation, dict) or any(
        not isinstance(allocation.get(k), list) for k in keys
    ):
        raise ValueError(
            f"adapter: {path}: 'allocation' must be an object of lists {list(keys)}, "
            f"got {json.dumps(allocation)[:80]}"
        )
    lengths = {len(allocation[k]) for k in keys}
    if len(lengths) != 1 or not allocation["num_experts"]:
        raise ValueError(f"adapter: {path}: 'allocation' lists must be non-empty, equal lengths")
    for key in keys:
        for value in allocation[key]:
            if key == "top_k" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"adapter: {path}: 'allocation' {key} holds {value!r}; expected ints >= 1"
                )


def read_adapter_config(directory: str) -> dict[str, Any]:
    """The validated ``adapter_config.json`` of ``directory``.

    Raises:
        ValueError: one line naming the file: missing, not JSON, not a JSON object, unknown or
            malformed fields, or written by a newer mola.
    """
    from mola import __version__
    from mola.core.config import MolaConfig

    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise ValueError(f"adapter: {directory} not found")
    if not os.path.isdir(directory):
        raise ValueError(
            f"adapter: {directory} is a file; pass the directory holding {CONFIG_NAME}"
        )
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"adapter: {path} not found; pass a directory written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as err:
        raise ValueError(f"adapter: {path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"adapter: {path} is not valid JSON ({err.msg} at line {err.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"adapter: {path}: expected a JSON object of config fields, got a {_json_type(data)}"
        )
    version = data.get("mola_version")
    if version is not None:
        if not isinstance(version, str) or not _version(version):
            raise ValueError(f"adapter: {path}: 'mola_version' is {version!r}, not a version")
        if _version(version) > _version(__version__):
            raise ValueError(
                f"adapter: {path} was written by mola {version}, newer than this mola "
                f"{__version__}; upgrade mola to load it"
            )
    saved_class = data.get("base_model_class")
    if saved_class is not None and not isinstance(saved_class, str):
        raise ValueError(f"adapter: {path}: 'base_model_class' must be a string")
    base = data.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"adapter: {path}: 'base_model_name_or_path' must be a string")
    if data.get("allocation") is not None:
        _check_allocation(data["allocation"], path)
    try:
        MolaConfig.from_dict(data)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        message = " ".join(str(err).split())
        raise ValueError(f"adapter: {path}: {message}") from None
    return data


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
