"""``mola compose --adapters DIR1 DIR2 ... --output DIR``: pre-trained PEFT LoRAs as experts.

Builds a mola adapter whose experts in every adapted module are the given LoRAs (one expert per
adapter, see :mod:`mola.experts.pretrained`) with a fresh router per module. Train the routers
with ``mola train --init-from DIR`` (the experts stay frozen unless ``--train-experts``).
"""

from __future__ import annotations

import argparse
import os

from mola.models.hub import DEFAULT_MODEL
from mola.models.placement import add_load_arguments, load_options_from_args
from mola.utils.io import write_json

HELP = "build a mola adapter whose experts are existing PEFT LoRA adapters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapters", nargs="+", required=True, metavar="DIR", help="PEFT LoRA adapter dirs"
    )
    parser.add_argument("--output", required=True, help="directory for the composed adapter")
    parser.add_argument(
        "--model", help="base model (default: the adapters' base_model_name_or_path)"
    )
    parser.add_argument("--router", default="soft", help="router of every module (default soft)")
    parser.add_argument("--top-k", type=int, help="experts per token for top-k style routers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new routers")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_load_arguments(parser)


def base_model_name(adapters: list, model: str | None) -> str:
    """``--model``, else the one base model the adapters name.

    Raises:
        ValueError: the adapters name different base models and ``--model`` is not given.
    """
    if model:
        return model
    names = {a.base_model for a in adapters if a.base_model}
    if len(names) > 1:
        raise ValueError(f"--adapters: they name different base models {sorted(names)}; "
                         f"pick one with --model")  # fmt: skip
    return names.pop() if names else DEFAULT_MODEL


def run(args: argparse.Namespace) -> int:
    import torch

    from mola.core.config import MolaConfig
    from mola.core.model import get_mola_model
    from mola.experts.pretrained import compose_into, read_peft_lora, target_names
    from mola.models.loading import load_base

    load = load_options_from_args(args)
    adapters = [read_peft_lora(d) for d in args.adapters]
    rank = max(a.max_rank for a in adapters)
    config = MolaConfig(
        target_modules=target_names(adapters),
        num_experts=len(adapters),
        r=rank,
        lora_alpha=float(rank),  # scale 1: each adapter's own scale is folded into its B
        lora_dropout=0.0,
        router=args.router,
        top_k=args.top_k if args.top_k is not None else min(2, len(adapters)),
    )
    name = base_model_name(adapters, args.model)
    base, _ = load_base(name, progress=not args.no_progress, options=load)
    torch.manual_seed(args.seed)
    model = get_mola_model(base, config)
    compose_into(model, adapters)
    model.save_pretrained(args.output)
    write_json(
        os.path.join(args.output, "composed_from.json"),
        {"adapters": [os.path.abspath(d) for d in args.adapters], "base_model": name},
    )
    print(
        f"composed {len(adapters)} LoRA adapters (rank <= {rank}) into {args.output}: "
        f"{len(dict(model.mola_layers()))} modules, {len(adapters)} experts each, "
        f"router {args.router}; train the routers with mola train --init-from {args.output}"
    )
    return 0
