"""Pre-trained LoRAs as experts (X-LoRA, LoRA-Mixer, MeteoRA, LoRA Soups).

:func:`read_peft_lora` reads a PEFT LoRA adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) into per-module ``(A, B, scaling)``; :func:`compose_into` copies
several of them into a mola model's stacked experts, one adapter per expert, so that with the
router's gate 1 on expert ``i`` a module computes exactly adapter ``i``'s update:

* ranks may differ: each ``A_i`` / ``B_i`` is zero-padded to the largest rank (zero rows and
  columns add nothing);
* scales may differ: each adapter's ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, and
  PEFT's ``alpha_pattern``) is folded into its ``B_i``, the mola layer's own scale being 1;
* targets may differ: where an adapter has no LoRA, its expert is zero there.

PEFT variants whose update is not ``scaling * B A x`` (DoRA, a bias on ``B``, embedding or
convolution LoRAs, ``modules_to_save``, activated LoRA (aLoRA: ``alora_invocation_tokens``, whose
update only acts after its invocation tokens)) and LoRAs outside the decoder layers (``lm_head``)
are refused with a message naming the adapter, before any model is loaded. The weights may be
``adapter_model.safetensors`` or the older ``adapter_model.bin``; a directory that holds PEFT's
named sub-adapters (``DIR/<name>/adapter_config.json``) is answered with their paths.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

PEFT_PREFIX = "base_model.model."


@dataclass
class PeftLora:
    """One PEFT LoRA adapter: ``modules[name] = (A (r, d_in), B (d_out, r), scaling)``."""

    path: str
    base_model: str | None
    modules: dict[str, tuple[Tensor, Tensor, float]] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    for key, value in (patterns or {}).items():  # PEFT's get_pattern_key: first match wins
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft_lora(directory: str) -> PeftLora:
    """Read a PEFT LoRA adapter directory.

    Raises:
        ValueError: a file is missing, it is not a plain LoRA, or its tensors do not pair up.
    """
    cfg_path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        named = _named_adapters(directory)
        if named:
            raise ValueError(
                f"--adapters: {directory} holds PEFT's named adapters {', '.join(named)} in "
                f"sub-directories; give each as its own directory, e.g. "
                f"{os.path.join(directory, named[0])}"
            )
        raise ValueError(f"--adapters: {cfg_path} not found; give PEFT LoRA adapter directories")
    weights = os.path.join(directory, "adapter_model.safetensors")
    legacy = os.path.join(directory, "adapter_model.bin")
    if not os.path.isfile(weights) and not os.path.isfile(legacy):
        raise ValueError(
            f"--adapters: {weights} not found (nor adapter_model.bin); give PEFT LoRA adapter "
            f"directories"
        )
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"--adapters: {cfg_path} is not valid JSON ({err.msg})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(
            f"--adapters: {directory} is a {cfg.get('peft_type')!r} adapter, not a PEFT LoRA"
        )
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "a bias on lora_B")):
        if cfg.get(key):
            raise ValueError(f"--adapters: {directory} uses {what}; only plain LoRA composes")
    if cfg.get("modules_to_save"):
        raise ValueError(f"--adapters: {directory} also saves full modules (modules_to_save)")
    if cfg.get("alora_invocation_tokens"):
        raise ValueError(
            f"--adapters: {directory} is an activated LoRA (aLoRA: alora_invocation_tokens), "
            f"whose update acts only after its invocation tokens; only plain LoRA composes"
        )
    tensors = load_file(weights) if os.path.isfile(weights) else _load_bin(legacy)
    for key in tensors:  # first: LoRAs outside the decoder layers (lm_head), named as such
        module = re.split(r"\.(?:lora_[A-Za-z_]+|base_layer)\b", key)[0].removeprefix(PEFT_PREFIX)
        if module != key.removeprefix(PEFT_PREFIX) and not any(
            part.isdigit() for part in module.split(".")
        ):
            raise ValueError(
                f"--adapters: {directory} has a LoRA on {module}, outside the decoder layers; "
                f"mola adapts the decoder layers' linear modules only"
            )
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        found = re.fullmatch(r"(.*)\.(lora_A|lora_B)\.weight", key)
        if found is None or tensor.dim() != 2:
            raise ValueError(
                f"--adapters: {directory} holds {key!r}; only linear LoRA weights compose"
            )
        name = found.group(1).removeprefix(PEFT_PREFIX)
        pairs.setdefault(name, {})[found.group(2)] = tensor
    adapter = PeftLora(directory, cfg.get("base_model_name_or_path"))
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"} or pair["lora_A"].shape[0] != pair["lora_B"].shape[1]:
            raise ValueError(f"--adapters: {directory}: {name} lacks a matching lora_A/lora_B")
        r = pair["lora_A"].shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        adapter.modules[name] = (pair["lora_A"], pair["lora_B"], float(scaling))
    if not adapter.modules:
        raise ValueError(f"--adapters: {directory} holds no LoRA weights")
    return adapter


def _named_adapters(directory: str) -> list[str]:
    """The sub-directories of ``directory`` that are PEFT adapters (named adapters), sorted."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        entry
        for entry in os.listdir(directory)
        if os.path.isfile(os.path.join(directory, entry, "adapter_config.json"))
    )


def _load_bin(path: str) -> dict[str, Tensor]:
    """PEFT's older ``adapter_model.bin`` (a pickled state dict, read with tensors only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file: one message)
        raise ValueError(f"--adapters: {path} cannot be read as a state dict ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--adapters: {path} does not hold a dict of tensors")
    return state


def target_names(adapters: list[PeftLora]) -> list[str]:
    """The last name components of every module any adapter adapts, sorted."""
    return sorted({name.rsplit(".", 1)[-1] for a in adapters for name in a.modules})


def stacked_parameters(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """The ``(E, r, d_in)`` / ``(E, d_out, r)`` expert tensors of a stacked mola layer."""
    own = dict(layer.named_parameters())
    names = {n.rsplit(".", 1)[-1]: n for n in own}
    if "lora_A" not in names or "lora_B" not in names or own[names["lora_A"]].dim() != 3:
        raise ValueError("compose: the layer does not hold stacked experts")
    return own[names["lora_A"]], own[names["lora_B"]]


def compose_into(model: nn.Module, adapters: list[PeftLora]) -> None:
    """Copy adapter ``i`` into expert ``i`` of every adapted module of ``model`` (a MolaModel).

    The model must hold stacked experts, ``len(adapters)`` per module, of rank >= every
    adapter's rank, with a scale of 1 (``lora_alpha == r``).

    Raises:
        ValueError: an adapter's module is not adapted in ``model`` or its shapes do not fit.
    """
    layers = dict(model.mola_layers())
    for adapter in adapters:
        missing = sorted(set(adapter.modules) - set(layers))
        if missing:
            raise ValueError(
                f"--adapters: {adapter.path} adapts {missing[0]}, which the base model does "
                f"not have among its decoder layers' linear modules"
            )
    with torch.no_grad():
        for name, layer in layers.items():
            lora_a, lora_b = stacked_parameters(layer)
            if lora_a.shape[0] != len(adapters) or not math.isclose(layer.scaling, 1.0):
                raise ValueError("compose: the model needs one expert per adapter and scale 1")
            lora_a.zero_()
            lora_b.zero_()
            for i, adapter in enumerate(adapters):
                if name not in adapter.modules:
                    continue
                a, b, scaling = adapter.modules[name]
                r = a.shape[0]
                if a.shape[1] != lora_a.shape[2] or b.shape[0] != lora_b.shape[1]:
                    raise ValueError(
                        f"--adapters: {adapter.path}: {name} is {b.shape[0]}x{a.shape[1]} there "
                        f"but {lora_b.shape[1]}x{lora_a.shape[2]} in the base model"
                    )
                lora_a[i, :r] = a.to(lora_a.dtype)
                lora_b[i, :, :r] = (b.double() * scaling).to(lora_b.dtype)


def freeze_experts(model: nn.Module) -> int:
    """Stop training every adapter tensor that is not a router's; returns how many it froze."""
    frozen = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) and "router" not in parts:
            frozen += param.requires_grad
            param.requires_grad_(False)
    return frozen
