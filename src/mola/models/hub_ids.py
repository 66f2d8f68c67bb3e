"""Hugging Face Hub ids (``ORG/NAME``): resolved through ``huggingface_hub``'s standard cache.

``--model Qwen/Qwen2.5-7B`` downloads the repository's config, tokenizer and safetensors
weights into the cache ``huggingface_hub`` uses everywhere (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), as ``models--ORG--NAME/snapshots/<commit>/``
with ``refs/<revision>`` naming the commit; a cached snapshot is used without a network call
when ``HF_HUB_OFFLINE=1``. Pickle weights (``*.bin``, ``*.pt``) are never downloaded and custom
code never runs (no ``trust_remote_code``). Every failure is one line naming the id and the cure.
"""

from __future__ import annotations

import re
from pathlib import Path

from mola.data.datasets import DataError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
"""What a Hub model id looks like: ``ORG/NAME`` (no leading ``/``, ``.`` or ``~``)."""

ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.jinja",
]
"""Files fetched from a repository: config, tokenizer, chat template and safetensors weights."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub id (``ORG/NAME``); a local path never reaches
    here when it exists, and ``./x/y`` or ``/x/y`` never match."""
    return bool(HUB_ID.match(name)) and not name.endswith((".json", ".yaml", ".yml"))


def hub_cache() -> str:
    """The cache directory ``huggingface_hub`` uses now (``HF_HUB_CACHE`` / ``HF_HOME``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _download(repo_id: str, revision: str | None, progress: bool, **kwargs: object) -> str:
    """``snapshot_download`` (or, with ``filename``, ``hf_hub_download``) with every failure
    turned into one :class:`DataError` line."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    where = f"{repo_id}@{revision}" if revision else repo_id
    fetch = (
        f"hf download {repo_id}"
        + (f" --revision {revision}" if revision else "")
        + " --include '*.json' '*.safetensors' '*.model' '*.txt'"
    )
    if not progress:
        disable_progress_bars()
    try:
        if "filename" in kwargs:
            return hf_hub_download(repo_id, revision=revision, cache_dir=hub_cache(), **kwargs)
        return snapshot_download(
            repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, cache_dir=hub_cache()
        )
    except GatedRepoError:
        raise DataError(
            f"model {where}: a gated repository; accept its terms on huggingface.co/{repo_id} and "
            "log in (hf auth login, or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise DataError(f"model {repo_id}: no revision {revision!r} on the Hub") from None
    except RepositoryNotFoundError:
        raise DataError(
            f"model {where}: no such repository on the Hub, or it is private (log in with "
            "hf auth login, or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 is set" if _offline() else "the Hub cannot be reached"
        raise DataError(
            f"model {where}: not in the Hugging Face cache ({hub_cache()}) and {why}; "
            f"pre-download it where there is a network: {fetch}"
        ) from None
    except EntryNotFoundError:
        raise DataError(f"model {where}: the repository has no {kwargs.get('filename')}") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise DataError(f"model {where}: cannot fetch it from the Hub ({_line(err)})") from None
    finally:
        if not progress:
            enable_progress_bars()


def resolve_hub_id(repo_id: str, revision: str | None = None, progress: bool = True) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (default ``main``),
    downloading what is missing unless ``HF_HUB_OFFLINE=1``.

    Raises:
        DataError: one line: not cached and not reachable (with the pre-download command), a
            gated or private repository (with how to log in), an unknown repository or
            revision, or a repository without safetensors weights.
    """
    where = f"{repo_id}@{revision}" if revision else repo_id
    path = Path(_download(repo_id, revision, progress))
    if not (path / "config.json").is_file():
        raise DataError(f"model {where}: the repository has no config.json ({path})")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json"))
    if not weights:
        raise DataError(
            f"model {where}: the repository has no safetensors weights; mola never loads pickle "
            "(*.bin) files: use a repository (or revision) that has *.safetensors"
        )
    return path


def hub_config_file(repo_id: str, revision: str | None = None) -> Path:
    """Only the ``config.json`` of ``repo_id`` (what ``mola train --dry-run`` needs), fetched
    into the same cache; one-line errors as :func:`resolve_hub_id`."""
    return Path(_download(repo_id, revision, False, filename="config.json"))
