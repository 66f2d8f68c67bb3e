"""``--device`` and ``--device-map`` on the inference commands: the resolution logic on the CPU,
placement on a GPU (marked, skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from mola import MolaConfig, get_mola_model
from mola.cli import main
from mola.models.loading import load_adapted, load_base
from mola.models.placement import LoadOptions, input_device, load_kwargs, resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
ROWS = [{"instruction": "Is it sarcastic?", "output": "yes"}, {"instruction": "Hi", "output": "no"}]


def test_auto_is_cuda_when_present_else_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want and resolve_device(None).type == want
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_refused(name):
    with pytest.raises(ValueError, match=rf"^--device: {name} requested but CUDA is not available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "gpu!", "cuda:x"])
def test_unreadable_or_unknown_device(name):
    with pytest.raises(ValueError, match="^--device: "):
        resolve_device(name)


def test_mps_only_where_present():
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        assert resolve_device("mps").type == "mps"
    else:
        with pytest.raises(ValueError, match="MPS is not available"):
            resolve_device("mps")


def test_load_kwargs_place_and_quantize():
    assert load_kwargs(LoadOptions(device="cpu")) == {"dtype": torch.float32}
    assert load_kwargs(LoadOptions(device_map="auto"))["device_map"] == "auto"
    bf16 = load_kwargs(LoadOptions(device="cpu", dtype="bfloat16"))
    assert bf16 == {"dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="--device and --device-map: choose one"):
        LoadOptions(device="cpu", device_map="auto").check()


def test_device_map_auto_loads_and_inputs_follow_the_first_device(tiny_llama_dir, tmp_path):
    base, _ = load_base(str(tiny_llama_dir), progress=False)
    model = get_mola_model(base, MolaConfig(num_experts=2, r=4))
    model.save_pretrained(tmp_path / "a")
    mapped, _ = load_adapted(
        str(tmp_path / "a"), progress=False, options=LoadOptions(device_map="auto")
    )
    placed = set(getattr(mapped.base_model, "hf_device_map", {"": "cpu"}).values())
    if not torch.cuda.is_available():  # accelerate puts everything on the CPU
        assert placed <= {"cpu", torch.device("cpu")}, placed
    first = input_device(mapped)
    ids = torch.randint(0, 600, (1, 5)).to(first)
    with torch.no_grad():
        assert mapped(input_ids=ids).logits.shape == (1, 5, mapped.config.vocab_size)


@no_cuda
@pytest.mark.parametrize("command", ["eval", "generate", "analyze", "prune", "merge", "compose"])
def test_commands_refuse_a_missing_gpu_in_one_line(command, tiny_llama_dir, tmp_path, capsys):
    base, _ = load_base(str(tiny_llama_dir), progress=False)
    get_mola_model(base, MolaConfig(num_experts=2, r=4)).save_pretrained(tmp_path / "a")
    adapter, out = str(tmp_path / "a"), str(tmp_path / "out")
    argv = {
        "eval": ["eval", "--adapter", adapter],
        "generate": ["generate", "hello", "--adapter", adapter],
        "analyze": ["analyze", "--adapter", adapter],
        "prune": ["prune", "--adapter", adapter, "--output", out],
        "merge": ["merge", "--adapter", adapter, "--output", out],
        "compose": ["compose", "--adapters", adapter, "--output", out],
    }[command]
    code = main([*argv, "--device", "cuda:0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == "mola: error: --device: cuda:0 requested but CUDA is not available here"


@no_cuda
def test_allocate_refuses_a_missing_gpu(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = main(
        ["allocate", "--model", str(tiny_llama_dir), "--data", str(data), "--budget", "4"]
        + ["--device", "cuda"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--device: cuda requested" in err[0], err


def test_eval_on_the_cpu_by_flag(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = main(
        ["eval", "--model", str(tiny_llama_dir), "--data", str(data), "--device", "cpu"]
        + ["--no-progress", "--output", str(tmp_path / "ev")]
    )
    assert code == 0, capsys.readouterr().err


@cuda
def test_eval_and_generate_run_on_the_gpu(tiny_llama_dir, tmp_path, capsys):
    base, _ = load_base(str(tiny_llama_dir), progress=False)
    get_mola_model(base, MolaConfig(num_experts=2, r=4)).save_pretrained(tmp_path / "a")
    model, _ = load_adapted(str(tmp_path / "a"), progress=False, options=LoadOptions())
    assert input_device(model).type == "cuda"
    assert all(p.device.type == "cuda" for p in model.parameters())
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = main(
        ["eval", "--adapter", str(tmp_path / "a"), "--data", str(data), "--device", "cuda"]
        + ["--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    code = main(["generate", "hi", "--adapter", str(tmp_path / "a"), "--max-new-tokens", "3"])
    assert code == 0, capsys.readouterr().err
