"""``mola merge --adapter DIR --output DIR2``: fold exactly mergeable modules into the base model.

A module folds exactly when its update does not depend on routing (one expert, or all experts
equal under gates that sum to 1; see :mod:`mola.inference.merge`). When every module folds, the
output is a plain transformers model directory (weights, config, tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` and no mola. When some cannot, the command lists them
and stops, unless ``--partial``: then the foldable modules are folded into the model written to
``DIR2`` and the others are kept as a mola adapter in ``DIR2/adapter`` on top of it (its outputs
equal the original adapter's). ``merge_report.json`` says what happened to each module, and the
largest logit difference between the adapter and the result on a probe batch.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

HELP = "fold one-expert (plain LoRA) modules into the base weights: a plain transformers model"

RESIDUAL_DIR = "adapter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, metavar="DIR", help="adapter to merge")
    parser.add_argument("--output", required=True, metavar="DIR", help="model directory to write")
    parser.add_argument("--model", help="base model (default: the one the adapter names)")
    parser.add_argument(
        "--partial",
        action="store_true",
        help=f"fold what can be folded; keep the rest as a mola adapter in OUTPUT/{RESIDUAL_DIR}",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from mola.models.placement import add_load_arguments

    add_load_arguments(parser)


def _probe_logits(model: Any) -> Any:
    import torch

    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=ids.to(device)).logits.float()


def _residual_config(model: Any, names: list[str], base_path: str) -> dict[str, Any]:
    config = model.adapter_config()
    config["target_modules"] = "|".join(re.escape(n) for n in names)
    config["base_model_name_or_path"] = base_path
    return config


def run(args: argparse.Namespace) -> int:
    from mola.core.checkpoint import save_adapter
    from mola.inference.merge import fold_modules, merge_plan
    from mola.models.loading import load_adapted
    from mola.models.placement import load_options_from_args
    from mola.utils.io import write_json
    from mola.utils.tables import table

    if os.path.abspath(args.output) == os.path.abspath(args.adapter):
        raise ValueError("--output: must differ from --adapter")
    load = load_options_from_args(args)
    if load.load_in_4bit or load.load_in_8bit:
        flag = "--load-in-4bit" if load.load_in_4bit else "--load-in-8bit"
        raise ValueError(
            f"{flag}: mola merge refuses to fold into quantized weights (the update would be "
            "rounded away); drop the flag: it loads the unquantized base (--dtype) and folds there"
        )
    model, tokenizer = load_adapted(args.adapter, args.model, not args.no_progress, options=load)
    plan = merge_plan(model)
    rows = [[d.module, d.num_experts, d.router, "yes" if d.mergeable else "no", d.reason]
            for d in plan]  # fmt: skip
    print(table(["module", "experts", "router", "merge", "why"], rows))
    kept = [d.module for d in plan if not d.mergeable]
    if kept and not args.partial:
        raise ValueError(
            f"{len(kept)} of {len(plan)} modules cannot be merged exactly (first: {kept[0]}: "
            f"{next(d.reason for d in plan if not d.mergeable)}); nothing written; pass "
            f"--partial to fold the others and keep these as an adapter"
        )
    before = _probe_logits(model)
    folded = fold_modules(model, {d.module for d in plan if d.mergeable})
    after = _probe_logits(model)
    diff = float((after - before).abs().max())
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    base = model.base_model
    if kept:
        save_adapter(
            os.path.join(output, RESIDUAL_DIR), _residual_config(model, kept, output), base
        )
        for _, layer in list(model.mola_layers()):  # unwrap before saving the plain model
            parent, _, child = layer.module_name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, child, layer.base_layer)
    base.save_pretrained(output)
    tokenizer.save_pretrained(output)
    write_json(
        os.path.join(output, "merge_report.json"),
        {
            "adapter": os.path.abspath(args.adapter),
            "folded": folded,
            "kept_as_adapter": kept,
            "max_abs_logit_diff": diff,
            "modules": [vars(d) for d in plan],
        },
    )
    print(f"folded {folded} of {len(plan)} modules; max |logit diff| on a probe batch {diff:.3g}")
    if kept:
        print(f"{len(kept)} modules kept as an adapter in {os.path.join(output, RESIDUAL_DIR)}")
    print(f"wrote {output}")
    return 0
