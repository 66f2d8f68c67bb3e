"""Step time of each expert structure against plain LoRA with the same trainable parameters.

Forward + backward of one adapted (d_in = d_out = 2048) frozen linear layer, N = 2048 tokens,
fp32. Each structure runs at its usual size (below); the baseline is one plain LoRA whose rank
gives the same number of trainable parameters (router included), rounded to the nearest rank.
Interleaved repeats, medians; activation memory = bytes autograd saves for backward (CPU).

    python benchmarks/bench_structures.py [--repeats 11] [--tokens 2048] [--dim 2048]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_layer import PlainLoRA, saved_bytes, step
from torch import nn

from mola import MolaLinear
from mola.experts import StructureOptions

# name -> (structure, num_experts, r, top_k, router)
CASES = {
    "stacked (MoLA)": ("stacked", 8, 8, 2, "topk"),
    "shared_a (HydraLoRA)": ("shared_a", 8, 8, None, "soft"),
    "shared_a + A dropout (MoSLD)": ("shared_a", 8, 8, 2, "topk"),
    "rankwise (SMoRA)": ("rankwise", 64, 64, 8, "topk"),
    "flylora (FlyLoRA)": ("flylora", 32, 32, 8, "topk"),
    "core (CoMoL)": ("core", 8, 8, 2, "topk"),
}


def build(name: str, base: nn.Linear) -> MolaLinear:
    structure, experts, r, k, router = CASES[name]
    options = StructureOptions(top_k=k, a_dropout=0.1 if "MoSLD" in name else 0.0)
    layer = MolaLinear(base, experts, r, 16.0, 0.0, k, router=router,
                       experts_structure=structure, structure_options=options)  # fmt: skip
    with torch.no_grad():
        layer.experts.lora_B.normal_()
    return layer.train()


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(
        f"fwd+bwd, d={args.dim}, N={args.tokens}, fp32, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print("| structure | E | r | top-k | trainable | LoRA rank | LoRA ms | ms | / LoRA "
          "| act. MiB LoRA / structure |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    device = torch.device(args.device)
    for name, (_, experts, r, k, _) in CASES.items():
        torch.manual_seed(0)
        base = nn.Linear(args.dim, args.dim, bias=False, device=device).requires_grad_(False)
        layer = build(name, base).to(device)
        params = trainable(layer)
        rank = max(1, round(params / (2 * args.dim)))
        lora = PlainLoRA(base, rank, 16)
        impls = {"lora": lora, "mine": layer}
        x = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
        upstream = torch.randn(args.tokens, args.dim, device=device)
        for fn in impls.values():
            for _ in range(2):
                step(fn, x, upstream)
        times: dict[str, list[float]] = {n: [] for n in impls}
        for _ in range(args.repeats):
            for n, fn in impls.items():
                times[n].append(step(fn, x, upstream))
        ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
        mem = {n: saved_bytes(fn, x) / 2**20 for n, fn in impls.items()}
        print(
            f"| {name} | {experts} | {r} | {k or 'all'} | {params:,d} | {rank} | "
            f"{ms['lora']:.1f} | {ms['mine']:.1f} | {ms['mine'] / ms['lora']:.2f}x | "
            f"{mem['lora']:.1f} / {mem['mine']:.1f} |"
        )


if __name__ == "__main__":
    main()
