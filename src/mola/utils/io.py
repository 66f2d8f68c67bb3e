"""Atomic file writes: a reader never sees a half-written output as if it were valid."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    Readers never see a half-written file; the file gets the usual permissions (``0666`` less
    the umask), not the private ones of a temporary file. Returns ``path`` as a string.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike[str], text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> None:
    """Fail now, not after the work, when files cannot be written into directory ``path``.

    ``path`` need not exist yet: its nearest existing ancestor must be a writable directory
    (tested by creating and removing a temporary file there). Nothing is left behind.

    Raises:
        ValueError: ``path`` or an ancestor is a file, or the directory is not writable.
    """
    shown = os.fspath(path)
    probe = os.path.abspath(shown)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        if probe == os.path.abspath(shown):
            raise ValueError(f"{flag} {shown}: is a file, not a directory")
        raise ValueError(f"{flag} {shown}: cannot create it, {probe} is a file")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".mola-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ValueError(f"{flag} {shown}: cannot write in {probe} ({err.strerror})") from None
