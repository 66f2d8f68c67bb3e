"""A closed stdout (``mola ... | head``) ends quietly: no ``mola: error: Broken pipe``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mola.cli import PIPE_CLOSED_STATUS, main


def _closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone: every write fails (EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize("argv", [["methods"], ["--help"], ["--version"]])
def test_closed_stdout_ends_quietly(argv, capsys, monkeypatch):
    stdout = os.fdopen(_closed_pipe(), "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert main(argv) == PIPE_CLOSED_STATUS
    finally:
        monkeypatch.undo()
        stdout.close()  # main pointed its descriptor at the null device: nothing left to fail
    assert capsys.readouterr().err == ""


def test_closed_stdout_console_script():
    """The real process: no error line and no 'Exception ignored' at interpreter exit."""
    write = _closed_pipe()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "mola.cli", "methods"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=300,
        )
    finally:
        os.close(write)
    assert (run.returncode, run.stderr) == (PIPE_CLOSED_STATUS, "")
