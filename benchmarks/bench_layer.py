"""Speed and activation memory of one MolaLinear against plain LoRA and a per-expert loop.

Forward + backward of a (d_in = d_out = 2048) frozen linear layer with N = 2048 tokens, fp32,
rank r = 8 per expert, top-k = 2, for E in {2, 4, 8}. Three implementations on the same frozen
base and the same input:

* ``lora``: one plain LoRA adapter of rank r (the baseline every ratio is against);
* ``mola``: mola's dense-gated MolaLinear;
* ``loop``: the per-expert loop of research code (gather each expert's tokens, index_add back).

Timings are interleaved (lora, mola, loop, lora, ...) and the median of the repeats is reported.
Activation memory is the bytes autograd saves for backward (CPU), or the CUDA peak above the
resting allocation when run on a GPU.

A second table (``--routers``, default every registered router) times one MolaLinear per router
at E = 8 (top-k 2 where the router takes one; the ``block`` scope is the ``topk`` rule with the
router computed once per sub-block, so it is not a separate row) against plain LoRA of the same
rank, interleaved in the same way.

    python benchmarks/bench_layer.py [--repeats 15] [--tokens 2048] [--dim 2048] [--device cpu]
    python benchmarks/bench_layer.py --experts --routers topk ldmole   # only the router table
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from mola import MolaLinear
from mola.routing import ROUTERS


class PlainLoRA(nn.Module):
    """y = W x + (alpha / r) B A x: the single-adapter baseline."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


class LoopMoLA(nn.Module):
    """The per-expert loop: route, then for each expert gather its tokens and index_add back."""

    def __init__(self, layer: MolaLinear, top_k: int) -> None:
        super().__init__()
        self.layer, self.top_k = layer, top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        probs = torch.softmax(layer.router(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = layer.base_layer(x)
        delta = torch.zeros_like(out)
        for e in range(layer.num_experts):
            token, slot = torch.where(experts == e)
            if token.numel() == 0:
                continue
            h = x[token] @ layer.lora_A[e].T @ layer.lora_B[e].T
            delta = delta.index_add(0, token, h * (weights[token, slot, None] * layer.scaling))
        return out + delta


def saved_bytes(fn, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``fn(x)``."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() != x.data_ptr():
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    out.sum().backward()
    return sum(seen.values())


def cuda_peak(fn, x: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rest = torch.cuda.memory_allocated()
    fn(x).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - rest


def step(fn, x: torch.Tensor, upstream: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x).backward(upstream)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(experts: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = nn.Linear(args.dim, args.dim, bias=False, device=device).requires_grad_(False)
    mola = MolaLinear(base, experts, r=args.rank, lora_alpha=16, lora_dropout=0.0, top_k=2)
    with torch.no_grad():
        mola.lora_B.normal_()
    impls = {"lora": PlainLoRA(base, args.rank, 16), "mola": mola, "loop": LoopMoLA(mola, 2)}
    x = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    upstream = torch.randn(args.tokens, args.dim, device=device)
    for fn in impls.values():  # warm up
        for _ in range(2):
            step(fn, x, upstream)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            times[name].append(step(fn, x, upstream))
    measure = cuda_peak if device.type == "cuda" else saved_bytes
    return {
        name: {"ms": 1e3 * statistics.median(times[name]), "mem": measure(impls[name], x) / 2**20}
        for name in impls
    }


def run_routers(routers: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Median fwd+bwd ms of plain LoRA and of a MolaLinear with each router (E = 8)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = nn.Linear(args.dim, args.dim, bias=False, device=device).requires_grad_(False)
    impls: dict[str, nn.Module] = {"lora": PlainLoRA(base, args.rank, 16)}
    for name in routers:
        layer = MolaLinear(
            base, 8, r=args.rank, lora_alpha=16, lora_dropout=0.0, top_k=2, router=name, top_p=0.75
        )
        with torch.no_grad():
            layer.lora_B.normal_()
        impls[name] = layer
    x = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    upstream = torch.randn(args.tokens, args.dim, device=device)
    for fn in impls.values():
        for _ in range(2):
            step(fn, x, upstream)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            times[name].append(step(fn, x, upstream))
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--experts", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--routers", nargs="*", default=list(ROUTERS), choices=list(ROUTERS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(
        f"MolaLinear fwd+bwd, d={args.dim}, N={args.tokens}, r={args.rank}, top-k=2, fp32, "
        f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(
        "| E | LoRA ms | MoLA ms | loop ms | MoLA / LoRA | loop / MoLA "
        "| act. MiB LoRA / MoLA / loop |"
    )
    print("|---|---|---|---|---|---|---|")
    for experts in args.experts:
        r = run(experts, args)
        lora, mola, loop = r["lora"], r["mola"], r["loop"]
        print(
            f"| {experts} | {lora['ms']:.1f} | {mola['ms']:.1f} | {loop['ms']:.1f} | "
            f"{mola['ms'] / lora['ms']:.2f}x | {loop['ms'] / mola['ms']:.2f}x | "
            f"{lora['mem']:.1f} / {mola['mem']:.1f} / {loop['mem']:.1f} |"
        )
    if args.routers:
        ms = run_routers(args.routers, args)
        print(f"\nE = 8 per router (LoRA r{args.rank}: {ms['lora']:.1f} ms)")
        print("| router | ms | / LoRA |")
        print("|---|---|---|")
        for name in args.routers:
            print(f"| {name} | {ms[name]:.1f} | {ms[name] / ms['lora']:.2f}x |")


if __name__ == "__main__":
    main()
