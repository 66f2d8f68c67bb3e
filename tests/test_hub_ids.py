"""Hub ids (``--model ORG/NAME``, ``--revision``) through a real ``huggingface_hub`` cache layout,
built offline from a tiny saved model: ``models--ORG--NAME/snapshots/<hash>/`` and ``refs/main``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mola.cli import main
from mola.data.datasets import DataError
from mola.models.hub import load_model_and_tokenizer
from mola.models.hub_ids import is_hub_id

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"
ROWS = [{"instruction": f"Name fruit {i}", "output": "apple"} for i in range(8)]


def _snapshot(cache: Path, repo: str, commit: str, source: Path, refs: tuple[str, ...]) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    shutil.copytree(source, snap)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, tiny_llama_dir, monkeypatch):
    """An offline Hugging Face cache holding ``tiny-org/tiny-llama`` at two commits: ``main``
    (the tiny model) and ``v0`` (the same model with its lm_head zeroed)."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "hf-cache"
    _snapshot(cache, REPO, COMMIT, tiny_llama_dir, ("main",))
    old = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        old.lm_head.weight.zero_()
    staged = tmp_path / "old"
    old.save_pretrained(staged)
    for name in os.listdir(tiny_llama_dir):
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(tiny_llama_dir / name, staged / name)
    _snapshot(cache, REPO, OLD, staged, ("v0",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_shape():
    assert is_hub_id("Qwen/Qwen2.5-7B") and is_hub_id("meta-llama/Llama-2-7b-hf")
    for name in ("smollm2-135m", "/abs/path", "./rel/dir", "a/b/c", "conf/x.yaml", "~/m"):
        assert not is_hub_id(name), name


def test_hub_id_loads_from_the_cache_offline(hub_cache, tiny_llama_dir):
    model, tokenizer = load_model_and_tokenizer(REPO, progress=False)
    local, _ = load_model_and_tokenizer(str(tiny_llama_dir), progress=False)
    for (name, a), b in zip(model.state_dict().items(), local.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert tokenizer.eos_token == "<|im_end|>"
    for revision in ("v0", OLD):  # a tag in refs/ and a commit hash
        old, _ = load_model_and_tokenizer(REPO, revision=revision, progress=False)
        assert torch.count_nonzero(old.lm_head.weight) == 0


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_not_cached_offline_says_how_to_predownload(hub_cache):
    with pytest.raises(DataError) as info:
        load_model_and_tokenizer("tiny-org/absent", progress=False)
    text = _one_line(info.value)
    assert "tiny-org/absent" in text and "HF_HUB_OFFLINE=1" in text
    assert "hf download tiny-org/absent" in text
    with pytest.raises(DataError, match="not in the Hugging Face cache"):
        load_model_and_tokenizer(REPO, revision="no-such-branch", progress=False)


def test_repo_without_safetensors_is_refused(hub_cache, tiny_llama_dir, tmp_path):
    staged = tmp_path / "pickle"
    staged.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", staged / "config.json")
    torch.save({"x": torch.zeros(1)}, staged / "pytorch_model.bin")
    _snapshot(hub_cache, "tiny-org/pickled", COMMIT, staged, ("main",))
    with pytest.raises(DataError) as info:
        load_model_and_tokenizer("tiny-org/pickled", progress=False)
    assert "no safetensors weights" in _one_line(info.value)


def test_cli_trains_on_a_hub_id_records_it_and_eval_reloads_by_id(hub_cache, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    code = main(
        [
            *["train", "--model", REPO, "--revision", "main", "--data", str(data)],
            *["--output", str(out), "--max-steps", "1", "--batch-size", "4", "--experts", "2"],
            *["--save-steps", "0", "--no-eval", "--no-progress"],
        ]
    )
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == REPO and saved["revision"] == "main"
    # a fresh process that reads HF_HUB_CACHE / HF_HUB_OFFLINE from the environment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "mola.cli", "eval", "--adapter", str(out), "--data", str(data)]
        + ["--limit", "2", "--no-progress", "--output", str(tmp_path / "ev")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert done.stderr.strip() == "", done.stderr


def test_cli_unknown_hub_id_is_one_line(hub_cache, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = main(
        [
            *["train", "--model", "tiny-org/absent", "--data", str(data)],
            *["--output", str(tmp_path / "o"), "--max-steps", "1", "--no-eval", "--no-progress"],
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("mola: error: model tiny-org/absent: not in the Hugging Face cache")


@pytest.mark.parametrize(
    ("error", "status", "says"),
    [
        ("GatedRepoError", 403, "a gated repository; accept its terms on huggingface.co/"),
        ("RepositoryNotFoundError", 404, "no such repository on the Hub, or it is private"),
    ],
)
def test_hub_refusals_are_one_line_with_the_cure(monkeypatch, error, status, says):
    """What the Hub answers for a gated or unknown repository (its own error classes, as
    ``snapshot_download`` raises them online) becomes one line saying what to do."""
    import importlib
    import importlib.util

    import huggingface_hub
    from huggingface_hub import errors

    http = next(
        (importlib.import_module(m) for m in ("httpx2", "httpx") if importlib.util.find_spec(m)),
        None,
    )
    if http is None:
        pytest.skip("huggingface_hub without httpx: its errors take a requests response")
    request = http.Request("GET", "https://huggingface.co/api/models/org/name")
    exc = getattr(errors, error)("refused", response=http.Response(status, request=request))

    def refuse(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(DataError) as info:
        load_model_and_tokenizer("org/name", progress=False)
    text = _one_line(info.value)
    assert text.startswith("model org/name: ") and says in text
    assert "hf auth login" in text


def test_dry_run_on_a_hub_id_reads_only_its_config(hub_cache, tmp_path, capsys):
    snapshot = hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    for path in snapshot.glob("*.safetensors"):
        path.unlink()  # a dry run needs no weights
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = main(
        [
            *["train", "--model", REPO, "--data", str(data), "--experts", "2", "--dry-run"],
            *["--output", str(tmp_path / "never")],
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"dry run (no weights loaded, nothing written): {REPO}" in captured.out
    assert not (tmp_path / "never").exists()
