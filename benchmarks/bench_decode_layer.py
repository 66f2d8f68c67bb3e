"""Per-module cost of one decode step: one token through one adapted projection.

SmolLM2-135M's up_proj shape (576 -> 1536), fp32, one thread: the frozen ``nn.Linear`` alone,
``MolaLinear`` (E 8, top-2, r 8) rebuilding its derived weights at every call (what every call
did before :mod:`mola.core.cache`), and ``MolaLinear`` with them cached (no grad).
Interleaved, medians of ``--repeats`` blocks of ``--calls`` calls. ``--ops`` also lists the
aten ops each path runs for one token (below autograd, so these are the kernels; views apart).

    python benchmarks/bench_decode_layer.py [--repeats 15] [--calls 200] [--ops]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mola.core.layer import MolaLinear

VIEWS = {"view", "t", "slice", "unsqueeze", "_unsafe_view", "transpose", "reshape", "alias"}


class OpLog(TorchDispatchMode):
    """The aten ops that run, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--ops", action="store_true", help="list the ops of one call per path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = nn.Linear(576, 1536, bias=False)
    layer = MolaLinear(base, 8, r=8, top_k=2).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(1, 1, 576)

    def uncached() -> None:
        layer._fused_a.clear()
        layer._b_rows.clear()
        layer(x)

    work = {
        "base Linear": lambda: base(x),
        "mola, rebuilt": uncached,
        "mola, cached": lambda: layer(x),
    }
    if args.ops:
        with torch.no_grad():
            for name, fn in work.items():
                fn()
                with OpLog() as log:
                    fn()
                kernels = [op for op in log.ops if op not in VIEWS]
                print(f"{name}: {len(log.ops)} ops, {len(kernels)} not views: {kernels}")
    times: dict[str, list[float]] = {k: [] for k in work}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in work.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["base Linear"]
    print(f"one token, 576 -> 1536, E 8 top-2 r 8, 1 thread, torch {torch.__version__}")
    print("| path | us per call | over the base Linear, us |")
    print("|---|---|---|")
    for name, value in med.items():
        print(f"| {name} | {value:.1f} | {value - ref:.1f} |")


if __name__ == "__main__":
    main()
