"""The job behind ``mola allocate``: load model and data, probe, fit the budget, write the files."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from mola.allocators import guilomo, redundancy
from mola.allocators.agreement import agreement_line, seed_agreement
from mola.allocators.budget import (
    BUDGET_KINDS,
    experts_at_rank,
    fit_budget,
    trainable_params,
)
from mola.allocators.plot import plot_allocation
from mola.allocators.probe import collate_rows, cycle, encode_examples, layer_costs, probe_model
from mola.core.allocation_file import write_allocation
from mola.data.prompts import default_template
from mola.training.options import TrainOptions, _opt

STRATEGIES = ("guilomo", "redundancy")


@dataclass
class AllocateOptions(TrainOptions):
    """``mola allocate``: the model/data options of ``mola train`` plus the budget and probe."""

    EXPERTS_FROM_FLAGS: ClassVar[bool] = False  # the allocation picks the expert counts
    NO_FLAG: ClassVar[frozenset[str]] = frozenset(
        # the probe picks the shape and always uses plain stacked experts: no structure options
        ("experts", "allocation", "init_from", "train_experts", "experts_structure")
        + ("module_patterns", "a_dropout", "fly_sparsity", "balance_bias_rate")
        # the probe is its own short loop: none of the Trainer's schedule, precision or saving
        + ("epochs", "max_steps", "grad_accum", "warmup_ratio", "scheduler", "weight_decay")
        + ("gradient_checkpointing", "bf16", "fp16", "resume", "overwrite", "save_steps")
        + ("logging_steps", "report_to", "dry_run")
        # and no evaluation
        + ("eval_data", "eval_limit", "eval", "eval_before", "scoring", "eval_batch_size")
        + ("eval_data_split",)
    )
    """Options of ``mola train`` that the probe ignores: ``mola allocate --help`` omits them."""

    budget: int | None = _opt(None, "total experts or trainable params (with --by params)")
    by: str = _opt("experts", "what --budget counts", choices=BUDGET_KINDS)
    strategy: str = _opt("guilomo", "allocation strategy", choices=STRATEGIES)
    max_experts: int = _opt(8, "largest candidate expert number (and the redundancy probe's)")
    probe_steps: int | None = _opt(
        None, "probe steps (default: guilomo --probe-epochs, redundancy 40)"
    )
    probe_epochs: float = _opt(
        4.0, "guilomo: epochs over the probe examples, in pairs of batches (the authors' 4)"
    )
    seeds: int = _opt(1, "guilomo: run the search with N seeds and report how their shapes agree")
    granularity: str = _opt(
        "layer",
        "guilomo: layer (per-layer shape fitted to --budget) or module (also each module's "
        "expert count and per-expert ranks as read off, the authors' granularity; no budget)",
        choices=("layer", "module"),
    )
    gsv_estimator: str = _opt(
        "authors",
        "guilomo: GSV estimator (authors' argmax masks, or gumbel)",
        choices=("authors", "gumbel"),
    )
    probe_examples: int = _opt(320, "training examples the probe uses")
    heldout: float = _opt(0.25, "redundancy: share of the probe examples held out to measure")
    gsv_lr: float = _opt(3e-3, "learning rate of the GuidedSelection Vectors (the authors')")
    output: str = _opt("alloc.yaml", "allocation YAML to write (a PNG is written beside it)")
    lr: float = _opt(2e-3, "learning rate of the probe's experts and routers")
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        if self.max_experts < 1:
            raise ValueError("--max-experts: must be >= 1")
        top_k = _single_int(self.top_k, "--top-k")
        if top_k > self.max_experts:
            raise ValueError(f"--top-k {top_k} exceeds --max-experts {self.max_experts}")
        self.experts = str(self.max_experts)  # the probe's shape (--experts is not used here)
        super().__post_init__()
        if self.budget is None:
            raise ValueError("--budget: required (total experts, or trainable params with --by)")
        if self.budget < 1:
            raise ValueError(f"--budget: must be a positive count, got {self.budget}")
        if self.probe_steps is not None and self.probe_steps < 1:
            raise ValueError(f"--probe-steps: must be >= 1, got {self.probe_steps}")
        if not self.probe_epochs > 0:
            raise ValueError(f"--probe-epochs: must be > 0, got {self.probe_epochs}")
        if self.granularity not in ("layer", "module"):
            raise ValueError(f"--granularity: 'layer' or 'module', got {self.granularity!r}")
        if self.granularity == "module" and self.strategy != "guilomo":
            raise ValueError("--granularity module: only the guilomo strategy reads off modules")
        if self.seeds < 1:
            raise ValueError(f"--seeds: must be >= 1, got {self.seeds}")
        if self.gsv_estimator not in ("authors", "gumbel"):
            raise ValueError(f"--gsv-estimator: 'authors' or 'gumbel', got {self.gsv_estimator!r}")
        if not 0.0 < self.heldout < 1.0:
            raise ValueError("--heldout: must be in (0, 1)")
        if self.probe_examples < 2:
            raise ValueError("--probe-examples: must be >= 2 (a training and a held-out split)")
        from mola.models.placement import resolve_device

        resolve_device(self.device)


def _single_int(value: str, flag: str) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{flag}: mola allocate needs one int here, got {value!r}") from None
    if out < 1:
        raise ValueError(f"{flag}: must be >= 1, got {out}")
    return out


def run_allocate(opts: AllocateOptions) -> dict[str, Any]:
    """Probe, allocate and write ``opts.output`` (YAML) and its PNG; returns the allocation."""
    from transformers import set_seed

    from mola.data.datasets import limit_examples
    from mola.data.sources import load_examples
    from mola.models.loading import load_base

    set_seed(opts.seed)
    r_max = _single_int(opts.r, "--r")
    top_k = _single_int(opts.top_k, "--top-k")
    examples = load_examples(
        opts.task,
        opts.data,
        "train",
        data_split=opts.data_split,
        data_config=opts.data_config,
        data_columns=opts.data_columns,
    )
    examples = limit_examples(examples, opts.train_limit)
    examples = examples[: opts.probe_examples]
    held = max(1, round(opts.heldout * len(examples)))
    if len(examples) - held < 1:
        raise ValueError("the training data is too small to split into training and held-out parts")
    base, tokenizer = load_base(
        opts.model, progress=opts.progress, options=opts.load_options(opts.device)
    )
    config = opts.mola_config()
    config.top_k = top_k
    pristine = copy.deepcopy(base) if opts.strategy == "guilomo" else None
    model = probe_model(base, config, opts.max_experts, r_max)
    costs = layer_costs(model)
    num_layers = len(costs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    template = opts.template or default_template(examples)
    rows = encode_examples(tokenizer, examples, template, opts.cutoff_len, opts.train_on_inputs)
    train_batches = collate_rows(rows[:-held], opts.batch_size, int(pad or 0))
    held_batches = collate_rows(rows[-held:], opts.batch_size, int(pad or 0))
    top_ks = [top_k] * num_layers
    start = time.perf_counter()
    scores: dict[str, Any]
    if opts.strategy == "guilomo":
        found, agreement = _guilomo(opts, pristine, config, r_max, rows, int(pad or 0))
        # the evidence for more than the smallest candidate (top_k experts, rank 1)
        expert_w = [e - top_k for e in found.experts]
        rank_w = [r - 1 for r in found.ranks]
        own_ranks = [max(1, round(r)) for r in found.ranks]
        own_total = sum(max(1, round(e)) for e in found.experts)
        scores = {
            "gsv_experts": found.experts,
            "gsv_ranks": found.ranks,
            "gsv_expected_experts": found.expected_experts,
            "gsv_expected_ranks": found.expected_ranks,
            "gsv_modules": found.modules,
        }
        if agreement is not None:
            scores["seed_agreement"] = agreement
        modules = module_shapes(found) if opts.granularity == "module" else None
        history = found.history
    else:
        found_r = redundancy.measure(
            model,
            cycle(train_batches, opts.seed),
            held_batches,
            opts.probe_steps or 40,
            lr=opts.lr,
            progress=opts.progress,
        )
        expert_w, rank_w = found_r.redundancy, [1.0] * num_layers
        own_ranks = [r_max] * num_layers
        own_total = experts_at_rank(expert_w, opts.budget, costs, top_ks, r_max)
        scores = {"redundancy": found_r.redundancy, "normalised_entropy": found_r.entropy}
        modules = None
        history = found_r.history
    probe_seconds = time.perf_counter() - start
    experts, ranks = fit_budget(
        opts.by,
        opts.budget,
        expert_w,
        rank_w,
        costs,
        top_ks,
        ranks=own_ranks,
        total_experts=own_total,
    )
    params = trainable_params(experts, ranks, costs)
    result = {
        "num_experts": experts,
        "r": ranks,
        "top_k": top_k,
        "num_layers": num_layers,
        "total_experts": sum(experts),
        "trainable_params": params,
        "strategy": opts.strategy,
        "by": opts.by,
        "budget": opts.budget,
        "probe_seconds": round(probe_seconds, 1),
        "model": opts.model,
        "data": opts.data or opts.task,
        "probe": {
            "steps": len(history) // (opts.seeds if opts.strategy == "guilomo" else 1),
            "epochs": opts.probe_epochs if opts.strategy == "guilomo" else None,
            "seeds": opts.seeds if opts.strategy == "guilomo" else 1,
            "examples": len(examples),
            "heldout": held if opts.strategy == "redundancy" else None,
            "max_experts": opts.max_experts,
            "max_rank": r_max,
            "lr": opts.lr,
            "gsv_lr": opts.gsv_lr,
            "template": template,
            "first_loss": history[0],
            "last_loss": history[-1],
        },
        "scores": scores,
    }
    if modules is not None:
        result["modules"] = modules
        result["module_experts"] = sum(m["num_experts"] for m in modules.values())
    write_allocation(opts.output, result)
    png = os.path.splitext(opts.output)[0] + ".png"
    title = f"{opts.strategy}, budget {opts.budget} {opts.by}: "
    title += f"{sum(experts)} experts, {params:,d} trainable params"
    plot_allocation(png, experts, ranks, title)
    result.update(png=png, output=opts.output)
    return result


def _guilomo(
    opts: AllocateOptions, base: Any, config: Any, r_max: int, rows: list, pad: int
) -> tuple[Any, dict[str, Any] | None]:
    """GuiLoMo's search once per seed (``--seeds``): the read-offs averaged over the seeds, and
    the seeds' agreement (``None`` for one seed)."""
    from transformers import set_seed

    runs = []
    for i in range(opts.seeds):
        seed = opts.seed + i
        set_seed(seed)
        model = probe_model(copy.deepcopy(base), config, opts.max_experts, r_max)
        batches = collate_rows(rows, opts.batch_size, pad)
        train, held, steps = guilomo.paired_batches(batches, opts.probe_epochs, seed)
        if opts.probe_steps is not None:  # an explicit length replaces the epochs
            train, held = cycle(batches, seed), cycle(batches, seed + 1)
            steps = opts.probe_steps
        found = guilomo.search(
            model, train, held, steps, lr=opts.lr, gsv_lr=opts.gsv_lr,
            estimator=opts.gsv_estimator, progress=opts.progress,
        )  # fmt: skip
        runs.append(found)
    found = runs[0]
    if len(runs) == 1:
        return found, None
    agreement = seed_agreement(
        [r.experts for r in runs],
        [r.ranks for r in runs],
        [{n: float(m["experts"]) for n, m in r.modules.items()} for r in runs],
    )
    mean = lambda xs: [sum(v) / len(v) for v in zip(*xs, strict=True)]  # noqa: E731
    found.experts = mean([r.experts for r in runs])
    found.ranks = mean([r.ranks for r in runs])
    found.expected_experts = mean([r.expected_experts for r in runs])
    found.expected_ranks = mean([r.expected_ranks for r in runs])
    found.history = [h for r in runs for h in r.history]
    names = list(found.modules)
    for name in names:  # each module: the seeds' mean count, each expert's mean rank
        k = max(1, round(sum(float(r.modules[name]["experts"]) for r in runs) / len(runs)))
        ranks = mean([r.all_ranks[name] for r in runs])
        found.modules[name] = {"experts": k, "ranks": [max(1, round(q)) for q in ranks[:k]]}
    return found, agreement


def module_shapes(found: Any) -> dict[str, dict[str, Any]]:
    """The per-module read-off as ``mola train --allocation`` reads it (``module_allocation``)."""
    return {
        name: {"num_experts": int(m["experts"]), "expert_ranks": [int(q) for q in m["ranks"]]}
        for name, m in found.modules.items()
    }


def summary(result: dict[str, Any]) -> str:
    """The one-line summary: total experts, trainable params, probe time, files (and, with
    ``--seeds``, how the seeds' shapes agree)."""
    agreement = result.get("scores", {}).get("seed_agreement")
    if agreement is not None:
        return _summary(result) + "\n" + agreement_line(agreement)
    return _summary(result)


def _summary(result: dict[str, Any]) -> str:
    if "modules" in result:
        return (
            f"mola allocate ({result['strategy']}, --granularity module): "
            f"{result['module_experts']} experts in {len(result['modules'])} modules as read off "
            f"(per-expert ranks; no budget), per-layer fallback {result['total_experts']} experts; "
            f"probe {result['probe_seconds']:.0f}s -> {result['output']}, {result['png']}"
        )
    return (
        f"mola allocate ({result['strategy']}, --by {result['by']} {result['budget']}): "
        f"{result['total_experts']} experts over {result['num_layers']} layers, "
        f"trainable params {result['trainable_params']:,d}, probe {result['probe_seconds']:.0f}s "
        f"-> {result['output']}, {result['png']}"
    )
