"""``mola methods``: the named method presets of ``mola train --method NAME``."""

from __future__ import annotations

import argparse

from mola.methods import METHODS

HELP = "list the method presets (mola train --method NAME) with their papers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", action="store_true", help="also show what each one sets")


def run(args: argparse.Namespace) -> int:
    width = max(len(name) for name in METHODS)
    for m in METHODS.values():
        print(f"{m.name:<{width}}  {m.description}")
        print(f"{'':<{width}}  {m.paper}")
    if args.settings:
        for m in METHODS.values():
            sets = ", ".join(f"{k}={v}" for k, v in m.settings.items()) or "(the defaults)"
            print(f"\n{m.name}: {sets}")
    print("\nmola train --method NAME [--flags]: flags and YAML keys override the preset.")
    return 0
