"""The ``mola`` command line: ``mola {train,eval,generate,demo,analyze} ...``.

Each command lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen command's module is imported. Bad input (a ``ValueError``,
``OSError`` or ``KeyError`` raised with a readable message) ends with one ``error: ...`` line and
exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mola import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mola.commands.train", "fine-tune a model with layer-wise MoE-LoRA"),
    "eval": ("mola.commands.eval", "evaluate an adapter (or the base model) on a task or file"),
    "generate": ("mola.commands.generate", "generate text with an adapter, streaming"),
    "demo": ("mola.commands.demo", "the main job: train the default recipe, print before/after"),
    "analyze": ("mola.commands.analyze", "routing and expert analysis of a trained adapter"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: mola <command> [options]   (mola {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "mola <command> --help shows a command's options."]
    return "\n".join(lines)


def build_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one command."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"mola {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"mola {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(
            f"error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    args = build_parser(argv[0]).parse_args(argv[1:])
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError, KeyError) as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
