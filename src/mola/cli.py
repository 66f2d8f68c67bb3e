"""The ``mola`` command line: ``mola {train,eval,generate,demo,analyze} ...``.

Each command lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen command's module is imported.

User errors (bad flags, bad files, a ``ValueError`` or ``OSError`` raised with a readable
message) end with exactly one line ``mola: error: ...`` on stderr and exit status 2, with or
without ``--debug`` (which adds the traceback above that line). Any other exception is a bug in
mola: Python's traceback and exit status 1.
A closed stdout (``mola sweep FILE --list | head -3``) is no error: mola stops quietly with
exit status 141 (128 + SIGPIPE), like other command-line tools.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import NoReturn

from mola import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mola.commands.train", "fine-tune a model with layer-wise MoE-LoRA"),
    "eval": ("mola.commands.eval", "evaluate an adapter (or the base model) on a task or file"),
    "generate": ("mola.commands.generate", "generate text with an adapter, streaming"),
    "demo": ("mola.commands.demo", "the main job: train the default recipe, print before/after"),
    "analyze": ("mola.commands.analyze", "routing and expert analysis of a trained adapter"),
    "sweep": ("mola.commands.sweep", "train a grid of runs (resumable), table mean/std over seeds"),
    "compose": ("mola.commands.compose", "build a mola adapter whose experts are PEFT LoRAs"),
    "allocate": ("mola.commands.allocate", "choose experts and ranks per layer under a budget"),
    "prune": ("mola.commands.prune", "drop rarely routed experts, merge near-identical ones"),
    "merge": ("mola.commands.merge", "fold plain-LoRA modules into the base model's weights"),
    "methods": ("mola.commands.methods", "list the method presets (mola train --method NAME)"),
}

USER_ERRORS = (ValueError, OSError)
"""Exceptions that report a user error (exit 2); everything else is a bug (exit 1)."""


class UsageError(ValueError):
    """A command line that argparse cannot read (unknown flag, bad value, missing argument)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised, so they print as one ``mola: error:`` line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: mola <command> [options]   (mola {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "mola <command> --help shows a command's options."]
    return "\n".join(lines)


def build_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one command."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = _Parser(prog=f"mola {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="also print the traceback of an error")
    parser.set_defaults(_run=module.run)
    return parser


def error_line(err: BaseException) -> str:
    """``mola: error: <message>`` on one line (a multi-line message is joined)."""
    text = " ".join(part.strip() for part in str(err).strip().splitlines() if part.strip())
    if isinstance(err, OSError) and err.strerror:  # "[Errno 2] ...: 'x'" -> "x: ..."
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return f"mola: error: {text or type(err).__name__}"


PIPE_CLOSED_STATUS = 141
"""Exit status when the reader of stdout went away (``mola ... | head``): 128 + SIGPIPE, as a
command killed by SIGPIPE reports in a shell."""


def _silence_stdout() -> None:
    """Point stdout at the null device so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a test's replaced stdout)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; a closed stdout (``mola ... | head``) ends quietly with status 141."""
    try:
        try:
            return _main(argv)
        finally:  # flush here so a pipe closed early is seen now, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return PIPE_CLOSED_STATUS


def _quiet_imports() -> None:
    """bitsandbytes (which peft imports) logs two lines about kernels-community kernels on
    import on some CPUs, and LLM.int8 warns on every call: not for a normal run's stderr."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*kernels-community.*")
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"mola {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(
            f"mola: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    debug = "--debug" in argv
    _quiet_imports()
    try:
        args = build_parser(argv[0]).parse_args(argv[1:])
        return int(args._run(args) or 0)
    except BrokenPipeError:  # the reader of stdout went away: not a user error (see main)
        raise
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(error_line(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mola: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a launcher's process group: close it cleanly
            from mola.utils.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
