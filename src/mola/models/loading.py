"""Load base models (built-in name, local directory or Hub id) and saved adapters onto them."""

from __future__ import annotations

import os
from typing import Any

import torch
import yaml

from mola.core.checkpoint import check_adapter_files
from mola.core.model import MolaModel
from mola.models.hub import BUILTIN_MODELS, DEFAULT_MODEL, load_model_and_tokenizer
from mola.models.hub_ids import is_hub_id
from mola.models.placement import LoadOptions, load_kwargs


def load_base(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    options: LoadOptions | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)``; a built-in model remembers its built-in name as ``name_or_path``
    and a Hub model its id (not the cache path), so adapters trained on it record that name.

    ``options`` (``--revision``, ``--dtype``, ``--load-in-4bit``/``8bit``, ``--device``,
    ``--device-map``) say how and where; without them the model is fp32 on the CPU (or
    ``dtype`` when given).
    """
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    revision = None
    if options is not None:
        kwargs = load_kwargs(options)
        if dtype is not None:
            kwargs["dtype"] = dtype
        revision = options.revision
    model, tokenizer = load_model_and_tokenizer(
        name_or_path, progress=progress, revision=revision, **kwargs
    )
    if name_or_path in BUILTIN_MODELS or (
        not os.path.isdir(os.path.expanduser(name_or_path)) and is_hub_id(name_or_path)
    ):
        model.config._name_or_path = name_or_path
        model.name_or_path = name_or_path
    if revision:
        model.config.mola_revision = revision
    return model, tokenizer


def load_adapted(
    adapter_dir: str,
    model: str | None = None,
    progress: bool = True,
    options: LoadOptions | None = None,
) -> tuple[MolaModel, Any]:
    """Load the base model an adapter names (or ``model``), then the adapter, in eval mode.

    Raises:
        ValueError: the directory is not an adapter or does not fit the base model.
    """
    saved = check_adapter_files(adapter_dir)  # a damaged adapter fails before the model loads
    name = model or saved.get("base_model_name_or_path") or DEFAULT_MODEL
    local = os.path.isdir(os.path.expanduser(name))
    if not model and name not in BUILTIN_MODELS and not local and not is_hub_id(name):
        raise ValueError(
            f"adapter {adapter_dir} was trained on the model {name}, which is not a directory "
            "here; pass its location with --model"
        )
    if not model and options is not None and options.revision is None:
        revision = saved.get("revision")  # the Hub revision the adapter was trained on
        if revision:
            options = LoadOptions(**{**vars(options), "revision": revision})
    base, tokenizer = load_base(name, progress=progress, options=options)
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
