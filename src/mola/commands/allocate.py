"""``mola allocate [CONFIG.yaml] --budget N [--by experts|params] [--strategy guilomo|redundancy]
--output alloc.yaml``: let a short probe on the data choose each layer's experts and rank.

Takes the model and data options of ``mola train``. Writes the allocation YAML (per-layer
``num_experts`` and ``r``, for ``mola train --allocation``), a PNG of the shape beside it, and
prints one summary line. See :mod:`mola.allocators`.
"""

from __future__ import annotations

import argparse

from mola.allocators.job import AllocateOptions, run_allocate, summary
from mola.training.options import add_option_flags, options_from_args

HELP = "choose experts and ranks per layer under a budget from a short probe on the data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_flags(parser, AllocateOptions)


def run(args: argparse.Namespace) -> int:
    result = run_allocate(options_from_args(args, AllocateOptions))
    print(summary(result))
    return 0
