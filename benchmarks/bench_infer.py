"""Inference speed of mola against the base model and PEFT LoRA on the default model.

Every variant sits on the same default model (SmolLM2-135M-Instruct, fp32) and shares its frozen
weights (PEFT merged has its own copy, since merging writes into the weights):

- ``base``: the model itself;
- ``lora``: PEFT LoRA r 8 on the seven projections, unmerged; ``lora merged``: the same, merged;
- ``mola``: the default config (inverted-triangle 2-4-6-8 experts, top-2, r 8, seven projections);
- ``mola E=8``: eight experts in every layer, top-2, r 8;
- ``mola grouped``, ``mola E=8 grouped``: the same adapters with input groups
  (:func:`mola.inference.group_inputs`: q/k/v and gate/up each run as one);
- ``mola pruned``: the default adapter after :func:`mola.inference.prune_model` with routing
  loads measured on the benchmark's prompts (``--min-load``, ``--merge-threshold``).

Adapter weights are random (``lora_B`` too, so nothing is trivially zero), which does not change
the cost. Work measured, interleaved over the variants in one process, medians over ``--repeats``:

- decode: greedy ``generate`` with the KV cache, batch 1 and batch 8 (left padding, prompts of
  different lengths), ms per new token = (time for ``1 + N`` new tokens - time for 1) / N, so the
  prompt's prefill is not counted;
- forward: one no-grad forward of 4 x 128 tokens (logits for every position), seconds.

    python benchmarks/bench_infer.py [--quick] [--repeats 5] [--new-tokens 32] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mola import MolaConfig, get_mola_model
from mola.data.datasets import load_task
from mola.data.prompts import render_prompt
from mola.inference.fused import group_inputs
from mola.models.loading import load_base

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are the original's (no weight memory added)."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def randomise_adapter(model: nn.Module, seed: int) -> None:
    """Non-zero ``lora_B`` (so the adapter changes outputs); other adapter weights stay as built."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)


def peft_lora(base: nn.Module, merged: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base) if merged else shared_copy(base),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS),
    )
    randomise_adapter(model, 1)
    return model.merge_and_unload() if merged else model


def mola(base: nn.Module, grouped: bool = False, **config: Any) -> nn.Module:
    model = get_mola_model(shared_copy(base), MolaConfig(lora_dropout=0.0, **config))
    randomise_adapter(model, 2)
    if grouped:
        group_inputs(model.eval())
    return model


def prompts(tokenizer: Any, count: int) -> list[str]:
    examples = load_task("sarcasm", "test")[:count]
    return [render_prompt(e, "qa", tokenizer) for e in examples]


def encode(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def generate(model: nn.Module, batch: dict[str, torch.Tensor], new: int, pad: int) -> Any:
    return model.generate(
        **batch,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        top_p=None,
        top_k=None,
        temperature=None,
        pad_token_id=pad,
    )


def decode_ms(model: nn.Module, batch: dict[str, torch.Tensor], new: int, pad: int) -> float:
    """Milliseconds per new token after the first (prefill excluded)."""
    one = timed(lambda: generate(model, batch, 1, pad))
    many = timed(lambda: generate(model, batch, 1 + new, pad))
    return 1000.0 * (many - one) / new


def forward_s(model: nn.Module, ids: torch.Tensor) -> float:
    return timed(lambda: model(input_ids=ids))


def build_variants(base: nn.Module, args: argparse.Namespace, calib: dict) -> dict[str, Any]:
    wanted = None if not args.only else {n.strip() for n in args.only.split(",")} | {"base"}
    makers: dict[str, Callable[[], nn.Module]] = {
        "base": lambda: base,
        "lora": lambda: peft_lora(base, merged=False),
        "lora merged": lambda: peft_lora(base, merged=True),
        "mola": lambda: mola(base),
        "mola E=8": lambda: mola(base, num_experts=8),
        "mola grouped": lambda: mola(base, grouped=True),
        "mola E=8 grouped": lambda: mola(base, grouped=True, num_experts=8),
    }
    if not args.no_prune:
        makers["mola pruned"] = lambda: pruned_mola(base, args, calib)
    variants = {k: make() for k, make in makers.items() if wanted is None or k in wanted}
    for name, model in variants.items():
        model.eval()
        if args.compile and name.startswith("mola"):
            model.base_model.compile(dynamic=True)
    return variants


def pruned_mola(base: nn.Module, args: argparse.Namespace, calib: dict) -> nn.Module:
    from mola.inference import measure_loads, prune_model

    model = mola(base)
    report = prune_model(model, measure_loads(model, [calib]), args.min_load, args.merge_threshold)
    kept = sum(layer.num_experts for _, layer in model.mola_layers())
    total = sum(r["experts_before"] for r in report)
    log(f"mola pruned: {total} -> {kept} experts (min load {args.min_load})")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 4 new tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--min-load", type=float, default=0.08, help="prune: drop below this load")
    parser.add_argument("--merge-threshold", type=float, default=0.05, help="prune: merge below")
    parser.add_argument("--no-prune", action="store_true", help="leave out the pruned variant")
    parser.add_argument("--compile", action="store_true", help="torch.compile the mola variants")
    parser.add_argument("--only", help="comma-separated variant names to run (default: all)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.new_tokens = 1, 4
    torch.manual_seed(0)
    base, tokenizer = load_base(progress=False)
    pad = tokenizer.pad_token_id
    texts = prompts(tokenizer, 8)
    one, eight = encode(tokenizer, texts[:1]), encode(tokenizer, texts)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (4, 128), generator=gen)
    start = time.perf_counter()
    variants = build_variants(base, args, eight)
    log(f"{len(variants)} variants built in {time.perf_counter() - start:.0f} s")
    names = list(variants)
    work: dict[str, Callable[[nn.Module], float]] = {
        "decode b1 ms/token": lambda m: decode_ms(m, one, args.new_tokens, pad),
        "decode b8 ms/token": lambda m: decode_ms(m, eight, args.new_tokens, pad),
        "forward 4x128 s": lambda m: forward_s(m, ids),
    }
    times = {(w, n): [] for w in work for n in names}
    with torch.inference_mode():
        for fn in work.values():  # warm-up (and compilation) outside the timing
            for name in names:
                fn(variants[name])
        log(f"warm-up done in {time.perf_counter() - start:.0f} s")
        for i in range(args.repeats):
            for what, fn in work.items():
                for name in names:
                    times[(what, name)].append(fn(variants[name]))
            log(f"repeat {i + 1}/{args.repeats} done at {time.perf_counter() - start:.0f} s")
    med = {key: statistics.median(v) for key, v in times.items()}
    print(
        f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"median of {args.repeats} interleaved repeats, {args.new_tokens} new tokens"
        + (", mola compiled" if args.compile else "")
    )
    print("| work | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for what in work:
        ref = med[(what, "base")]
        cells = [f"{med[(what, n)]:.{3 if 's' == what[-1] else 1}f}" for n in names]
        cells = [cells[0]] + [
            f"{c} ({med[(what, n)] / ref:.2f}x)" for c, n in zip(cells[1:], names[1:], strict=True)
        ]
        print(f"| {what} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
