"""``mola train [CONFIG.yaml] [--flags]``: fine-tune with layer-wise MoE-LoRA."""

from __future__ import annotations

import argparse

from mola.training.options import add_option_flags, options_from_args
from mola.training.pipeline import run_training, summary

HELP = "fine-tune a model with layer-wise MoE-LoRA"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_flags(parser)


def run(args: argparse.Namespace) -> int:
    results = run_training(options_from_args(args))
    if "dry_run" in results:  # the report is printed; nothing was trained
        return 0
    if results.get("main_process", True):  # under torchrun only rank 0 reports
        print(summary(results))
    return 0
