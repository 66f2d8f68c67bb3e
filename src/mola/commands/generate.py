"""``mola generate --adapter DIR "prompt"``: generate with an adapter, streaming to the terminal."""

from __future__ import annotations

import argparse
import sys

from mola.data.datasets import Example
from mola.data.prompts import TEMPLATES, render_prompt
from mola.inference.compiled import add_compile_argument, compile_for_cli
from mola.inference.fused import add_group_argument, group_for_cli
from mola.models.hub import DEFAULT_MODEL
from mola.models.loading import load_adapted, load_base
from mola.models.placement import add_load_arguments, input_device, load_options_from_args

HELP = "generate text with an adapter, streaming"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the instruction / question")
    parser.add_argument("--adapter", help="adapter directory (omit for the base model)")
    parser.add_argument("--model", help=f"base model (default: the adapter's, or {DEFAULT_MODEL})")
    parser.add_argument("--input", default="", help="optional input/context for the prompt")
    parser.add_argument(
        "--template",
        default="alpaca",
        choices=(*TEMPLATES, "raw"),
        help="wrap the prompt in a template ('raw': use it as is)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide loading progress")
    add_compile_argument(parser)
    add_load_arguments(parser)
    add_group_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from mola.core.checks import check_number

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    check_number("--temperature", args.temperature, low=0.0)
    if not args.prompt.strip():
        raise ValueError("prompt: empty; give the instruction or question to answer")
    progress = not args.no_progress
    load = load_options_from_args(args)
    if args.adapter:
        model, tokenizer = load_adapted(args.adapter, args.model, progress, options=load)
    else:
        model, tokenizer = load_base(args.model or DEFAULT_MODEL, progress=progress, options=load)
    model.eval()
    compile_for_cli(model, args.compile)
    group_for_cli(model, args)
    if args.template == "raw":
        text = args.prompt
    else:
        text = render_prompt(Example(args.prompt, args.input), args.template, tokenizer)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = input_device(model)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=sample,
            temperature=args.temperature if sample else None,
            top_p=None,
            top_k=None,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    sys.stdout.flush()
    return 0
