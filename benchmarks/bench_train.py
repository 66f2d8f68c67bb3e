"""Training-step speed and memory of mola against PEFT LoRA on the default model.

Both adapters sit on their own copy of the default model (SmolLM2-135M-Instruct), see the same
batches of the default task (sarcasm, alpaca template) and train with AdamW. MoLA uses the default
config (inverted-triangle experts, top-2, r 8 per expert, all seven projections); PEFT LoRA uses
r 8 on the same seven projections. Steps are interleaved (mola, lora, mola, ...) in one process and
the median step time is reported.

Memory: on CUDA the peak allocated above the resting state during a step; on CPU (no allocator
statistics) the bytes autograd saves for backward plus the trainable state (weights, gradients and
the two AdamW moments), which is what training adds above the frozen model.

fp32 against bf16: ``--bf16`` adds rows for both adapters trained under bf16 autocast with fp32
master weights (what ``mola train --bf16`` does), interleaved with the fp32 steps.

    python benchmarks/bench_train.py [--steps 10] [--batch-size 8] [--device cpu] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

from mola import MolaConfig, get_mola_model
from mola.data.datasets import load_task
from mola.data.prompts import DataCollator, encode_for_training
from mola.models.loading import load_base


def peft_lora(model: torch.nn.Module, cfg: MolaConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=8,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def trainable_state_bytes(model: torch.nn.Module) -> int:
    return sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def step(model, optimizer, batch, bf16: bool = False) -> float:
    device = batch["input_ids"].device
    if device.type == "cuda":
        torch.cuda.synchronize()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    start = time.perf_counter()
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def memory(model, optimizer, batch) -> int:
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rest = torch.cuda.memory_allocated()
        step(model, optimizer, batch)
        return torch.cuda.max_memory_allocated() - rest
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    saved = sum(v for (ptr, _), v in seen.items() if ptr not in frozen)
    return saved + trainable_state_bytes(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast steps")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    base, tokenizer = load_base(progress=False)
    cfg = MolaConfig()
    models = {
        "mola": get_mola_model(copy.deepcopy(base), cfg).to(device).train(),
        "lora": peft_lora(base, cfg).to(device).train(),
    }
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-4)
        for k, m in models.items()
    }
    examples = load_task("sarcasm", "train")[: args.batch_size * (args.steps + 2)]
    collate = DataCollator(tokenizer.pad_token_id)
    rows = [encode_for_training(tokenizer, e, "alpaca", args.cutoff_len) for e in examples]
    batches = [
        {k: v.to(device) for k, v in collate(rows[i : i + args.batch_size]).items()}
        for i in range(0, len(rows), args.batch_size)
    ]
    runs = [(name, False) for name in models] + [(name, True) for name in models if args.bf16]
    times: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    for i, batch in enumerate(batches):
        for name, bf16 in runs:
            elapsed = step(models[name], optimizers[name], batch, bf16)
            if i >= 2:  # warm-up steps are not timed
                times[(name, bf16)].append(elapsed)
    mem = {k: memory(m, optimizers[k], batches[0]) / 2**20 for k, m in models.items()}
    medians = {k: statistics.median(v) for k, v in times.items()}
    med = {name: medians[(name, False)] for name in models}
    params = {
        k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()
    }
    tokens = int(batches[0]["attention_mask"].sum())
    print(
        f"train step, SmolLM2-135M, batch {args.batch_size} (~{tokens} tokens), {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
        f"{len(times[('mola', False)])} interleaved steps"
    )
    print("| adapter | trainable params | step s | steps/s | memory MiB |")
    print("|---|---|---|---|---|")
    for name in ("lora", "mola"):
        label = "PEFT LoRA r8" if name == "lora" else "mola inverted-triangle top-2 r8"
        print(
            f"| {label} | {params[name]:,d} | {med[name]:.3f} | {1 / med[name]:.2f} | "
            f"{mem[name]:.0f} |"
        )
    print(
        f"| ratio mola / LoRA | {params['mola'] / params['lora']:.2f}x | "
        f"{med['mola'] / med['lora']:.2f}x | | {mem['mola'] / mem['lora']:.2f}x |"
    )
    if args.bf16:
        print("\n| adapter | fp32 step s | bf16 step s | bf16 / fp32 |")
        print("|---|---|---|---|")
        for name in ("lora", "mola"):
            fp32, bf16 = medians[(name, False)], medians[(name, True)]
            print(f"| {name} | {fp32:.3f} | {bf16:.3f} | {bf16 / fp32:.2f}x |")


if __name__ == "__main__":
    main()
