"""Load base models (by built-in name or local directory) and saved adapters onto them."""

from __future__ import annotations

import os
from typing import Any

import torch
import yaml

from mola.core.checkpoint import check_adapter_files
from mola.core.model import MolaModel
from mola.models.hub import BUILTIN_MODELS, DEFAULT_MODEL, load_model_and_tokenizer


def load_base(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, progress: bool = True
) -> tuple[Any, Any]:
    """``(model, tokenizer)``; a built-in model remembers its built-in name as ``name_or_path``,
    so adapters trained on it record that name rather than a cache path."""
    model, tokenizer = load_model_and_tokenizer(name_or_path, dtype=dtype, progress=progress)
    if name_or_path in BUILTIN_MODELS:
        model.config._name_or_path = name_or_path
        model.name_or_path = name_or_path
    return model, tokenizer


def load_adapted(
    adapter_dir: str, model: str | None = None, progress: bool = True
) -> tuple[MolaModel, Any]:
    """Load the base model an adapter names (or ``model``), then the adapter, in eval mode.

    Raises:
        ValueError: the directory is not an adapter or does not fit the base model.
    """
    saved = check_adapter_files(adapter_dir)  # a damaged adapter fails before the model loads
    name = model or saved.get("base_model_name_or_path") or DEFAULT_MODEL
    if not model and name not in BUILTIN_MODELS and not os.path.isdir(name):
        raise ValueError(
            f"adapter {adapter_dir} was trained on the model {name}, which is not a directory "
            "here; pass its location with --model"
        )
    base, tokenizer = load_base(name, progress=progress)
    return MolaModel.from_pretrained(base, adapter_dir).eval(), tokenizer


def training_template(adapter_dir: str | None) -> str | None:
    """The prompt template an adapter was trained with (from ``train_config.yaml``), if known."""
    path = os.path.join(adapter_dir, "train_config.yaml") if adapter_dir else None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            options = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ValueError(
            f"adapter: {path} is not valid YAML; repair it or pass --template"
        ) from None
    template = options.get("template") if isinstance(options, dict) else None
    return template if isinstance(template, str) else None
