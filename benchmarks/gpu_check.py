"""A GPU self-check: is mola correct and fast on this GPU? One command, one JSON and one table.

    python benchmarks/gpu_check.py                      # on a CUDA machine (~1B model, bf16)
    python benchmarks/gpu_check.py --device cpu --tiny  # anywhere, in seconds (CI runs this)
    python benchmarks/gpu_check.py --output DIR         # gpu_check.json and gpu_check.md in DIR

It writes three sections:

(a) **layers**: for every router (:data:`mola.routing.ROUTERS`) and expert structure
    (:data:`mola.experts.STRUCTURES`), one :class:`~mola.MolaLinear` on a bf16 base (fp32
    adapters, cast in and out as PEFT does) against the same layer on the fp32 base, both fed
    the same bf16-rounded input (so every router picks the same experts and the difference is
    the bf16 base's own): the relative L2 difference of the outputs, and whether it is within
    :data:`LAYER_TOLERANCE`;
(b) **training**: tokens/s and peak memory of mola (the default shape, and 8 experts per layer)
    and PEFT LoRA (r 8) on a Llama-shaped model built from its config (random weights, nothing
    downloaded: about 1.1B parameters, or a tiny one with ``--tiny``), bf16 weights, AdamW;
(c) **decode**: greedy decoding ms/token of the base model, mola and PEFT LoRA.

Every timing is the median over ``--steps`` after warm-up. Peak memory is CUDA's
``max_memory_allocated`` (not measured on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

from mola import MolaConfig, MolaLinear, get_mola_model
from mola.experts.registry import STRUCTURES
from mola.routing import ROUTERS

WARMUP = 1
"""Untimed steps before the timed ones (CUDA kernels, allocator, caches)."""
LAYER_TOLERANCE = 0.03
"""Largest relative L2 difference of a layer's output on a bf16 base from its fp32 output."""

FULL = dict(  # TinyLlama-1.1B's shape
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
STRUCTURE_SETTINGS = {
    "stacked": dict(num_experts=4, r=8, top_k=2),
    "shared_a": dict(num_experts=4, r=8, top_k=2),
    "rankwise": dict(num_experts=1, r=8, top_k=2),
    "flylora": dict(num_experts=1, r=8, top_k=2),
    "core": dict(num_experts=4, r=8, top_k=2),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_checks(device: torch.device, width: int) -> list[dict[str, Any]]:
    """(a): every router on stacked experts, every structure on its default router."""
    cases = [("router", name, dict(num_experts=4, r=8, top_k=2, router=name)) for name in ROUTERS]
    cases += [
        ("structure", name, dict(experts_structure=name, **STRUCTURE_SETTINGS[name]))
        for name in STRUCTURES
    ]
    rows = []
    for kind, name, settings in cases:
        torch.manual_seed(0)
        base = nn.Linear(width, width).to(device)
        options = dict(settings)
        structure = options.pop("experts_structure", "stacked")
        if structure in ("rankwise", "flylora"):
            options["num_experts"] = options["r"]
        from mola.experts import StructureOptions

        layer = MolaLinear(
            base,
            options.pop("num_experts"),
            r=options.pop("r"),
            top_k=options.pop("top_k"),
            router=options.pop("router", "topk"),
            top_p=0.5,
            experts_structure=structure,
            structure_options=StructureOptions(top_k=2),
        ).eval()
        with torch.no_grad():
            for pname, p in layer.named_parameters():
                if "lora_B" in pname:
                    p.normal_(std=0.05)
                elif "router" in pname:
                    p.mul_(3.0)
        low = copy.deepcopy(layer)
        low.base_layer.to(torch.bfloat16)
        # one input for both, rounded to bf16: a rounded input can flip a near-tied routing
        # choice (SMoRA's top-k of saturating sigmoid scores shows it), which is not an error
        x = torch.randn(4, 32, width, device=device).to(torch.bfloat16)
        with torch.no_grad():
            want = layer(x.float())
            got = low(x)
        rel = ((got.float() - want).norm() / want.norm()).item()
        rows.append(
            {
                "kind": kind,
                "name": name,
                "out_dtype": str(got.dtype).removeprefix("torch."),
                "adapter_dtype": str(low.lora_A.dtype).removeprefix("torch."),
                "rel_diff": rel,
                "ok": rel < LAYER_TOLERANCE and got.dtype == torch.bfloat16,
            }
        )
    return rows


def build_model(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def peft_lora(model: nn.Module) -> nn.Module | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))


def adapters(shape, device, dtype) -> dict[str, nn.Module]:
    """The adapted models to compare: mola default, mola E=8, PEFT LoRA (when installed)."""
    layers = shape["num_hidden_layers"]
    default = MolaConfig(num_experts="inverted-triangle" if layers >= 4 else 4, top_k=2, r=8)
    out = {
        "mola default": get_mola_model(build_model(shape, device, dtype), default),
        "mola E=8": get_mola_model(
            build_model(shape, device, dtype), MolaConfig(num_experts=8, top_k=2, r=8)
        ),
    }
    lora = peft_lora(build_model(shape, device, dtype))
    if lora is not None:
        out["PEFT LoRA r8"] = lora
    return out


def train_checks(shape, device, dtype, batch, seq, steps) -> list[dict[str, Any]]:
    """(b): tokens/s and peak memory of AdamW training steps."""
    rows = []
    for name, model in adapters(shape, device, dtype).items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).to(device)
        times = []
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(steps + WARMUP):
            sync(device)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        step = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rows.append(
            {
                "adapter": name,
                "trainable_params": sum(p.numel() for p in params),
                "step_s": step,
                "tokens_per_s": batch * seq / step,
                "peak_memory_gb": None if peak is None else peak / 1e9,
                "loss_finite": bool(torch.isfinite(loss).item()),
            }
        )
        del model, optimizer
    return rows


def decode_checks(shape, device, dtype, new_tokens, steps) -> list[dict[str, Any]]:
    """(c): greedy decoding ms/token of the base model, mola and PEFT LoRA."""
    models = {"base model": build_model(shape, device, dtype)}
    models.update(adapters(shape, device, dtype))
    prompt = torch.randint(
        0, shape["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1)
    )
    prompt = prompt.to(device)
    rows = []
    for name, model in models.items():
        model.eval()
        times = []
        for i in range(steps + WARMUP):
            sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            sync(device)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        made = out.shape[1] - prompt.shape[1]
        rows.append(
            {
                "model": name,
                "new_tokens": made,
                "ms_per_token": 1e3 * statistics.median(times) / made,
            }
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# mola GPU self-check ({env['device_name']}, {result['model']})",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, mola {env['mola']}, "
        f"{result['dtype']} weights; {result['notes']}",
        "",
        "## (a) layer outputs, bf16 base vs fp32 base",
        "",
        "| kind | name | output dtype | adapter dtype | rel. L2 diff | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["layers"]:
        lines.append(
            f"| {r['kind']} | {r['name']} | {r['out_dtype']} | {r['adapter_dtype']} | "
            f"{r['rel_diff']:.2e} | {'yes' if r['ok'] else 'NO'} |"
        )
    lines += [
        "",
        f"## (b) training, batch {result['batch']} x {result['seq']} tokens",
        "",
        "| adapter | trainable params | step s | tokens/s | peak memory GB |",
        "|---|---|---|---|---|",
    ]
    for r in result["train"]:
        peak = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
        lines.append(
            f"| {r['adapter']} | {r['trainable_params']:,d} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {peak} |"
        )
    lines += ["", "## (c) greedy decoding", "", "| model | ms/token |", "|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['model']} | {r['ms_per_token']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: runs in seconds")
    parser.add_argument("--output", default=".", help="directory for gpu_check.json / .md")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; tiny 1)")
    args = parser.parse_args(argv)
    from mola import __version__
    from mola.models.placement import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    steps = args.steps or (1 if args.tiny else 10)
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft on transformers 5
    shape = TINY if args.tiny else FULL
    batch, seq = (2, 32) if args.tiny else (4, 512)
    dtype = torch.bfloat16
    import transformers

    result: dict[str, Any] = {
        "environment": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "mola": __version__,
        },
        "model": "tiny Llama (random)" if args.tiny else "Llama 1.1B shape (random)",
        "shape": shape,
        "dtype": "bf16",
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "notes": "random weights built from a config; medians over the timed steps",
    }
    result["layers"] = layer_checks(device, shape["hidden_size"])
    result["train"] = train_checks(shape, device, dtype, batch, seq, steps)
    result["decode"] = decode_checks(shape, device, dtype, 8 if args.tiny else 64, steps)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "gpu_check.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    table = markdown(result)
    with open(os.path.join(args.output, "gpu_check.md"), "w", encoding="utf-8") as fh:
        fh.write(table)
    print(table)
    print(f"wrote {os.path.join(args.output, 'gpu_check.json')} and gpu_check.md")
    bad = [r["name"] for r in result["layers"] if not r["ok"]]
    if bad:
        print(f"gpu_check: layer outputs off on bf16 for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
