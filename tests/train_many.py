"""Run several ``mola train`` commands in one process: ``python train_many.py RUNS.json``.

``RUNS.json`` is a list of argument lists (each without the leading ``train``). Under
``torchrun`` one launch then trains every run on the same process group, which keeps the
data-parallel router tests to two launches however many routers they compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mola.cli import build_parser
from mola.training.distributed import shutdown


def main(path: str) -> int:
    runs = json.loads(Path(path).read_text())
    try:
        for argv in runs:
            args = build_parser("train").parse_args(argv)
            args._run(args)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
