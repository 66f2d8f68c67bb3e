"""The allocation file (YAML): its format, reading, writing and fit to a model.

``mola allocate`` writes, e.g.::

    num_experts: [2, 2, 3, ...]   # one entry per decoder layer
    r: [8, 8, 6, ...]             # one entry per decoder layer
    top_k: 2
    num_layers: 30
    total_experts: 120
    trainable_params: 9876543
    strategy: guilomo
    by: experts
    budget: 120
    probe_seconds: 151.2
    scores: {...}                 # what the strategy measured per layer

``mola train --allocation FILE`` reads ``num_experts``, ``r`` and (if present) ``top_k``; the two
lists can also be pasted into a training config as ``experts:`` and ``r:``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml

from mola.utils.io import write_text

REQUIRED = ("num_experts", "r")


def _int_list(value: Any, key: str, path: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"allocation file {path}: {key} must be a non-empty list of ints")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ValueError(f"allocation file {path}: every {key} entry must be an int >= 1")
    return list(value)


def write_allocation(path: str | os.PathLike[str], allocation: Mapping[str, Any]) -> None:
    """Write ``allocation`` (``num_experts`` and ``r`` lists plus any extra keys) as YAML."""
    data = dict(allocation)
    for key in REQUIRED:
        data[key] = [int(v) for v in data[key]]
    head = {k: data.pop(k) for k in (*REQUIRED, "top_k", "num_layers") if k in data}
    text = "# layer-wise allocation written by mola allocate; use: mola train --allocation FILE\n"
    text += yaml.safe_dump(head, sort_keys=False, default_flow_style=None, width=100)
    text += yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=None, width=100)
    write_text(path, text)


def _plain(value: Any) -> Any:
    """Floats rounded for reading; tuples to lists; everything YAML-safe."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def read_allocation(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an allocation file: ``num_experts`` and ``r`` (one per layer), optional ``top_k``.

    Raises:
        ValueError: the file is missing, not YAML, or lacks valid ``num_experts``/``r`` lists of
            the same length.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--allocation: file {path} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError:
        raise ValueError(f"allocation file {path}: invalid YAML") from None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        raise ValueError(f"allocation file {path}: needs num_experts and r lists (one per layer)")
    out = dict(data)
    out["num_experts"] = _int_list(data["num_experts"], "num_experts", path)
    out["r"] = _int_list(data["r"], "r", path)
    if len(out["num_experts"]) != len(out["r"]):
        raise ValueError(f"allocation file {path}: num_experts and r differ in length")
    top_k = data.get("top_k")
    if top_k is not None and not isinstance(top_k, (int, list, str)):
        raise ValueError(f"allocation file {path}: top_k must be an int or a list")
    return out


def check_fits(allocation: Mapping[str, Any], num_layers: int, path: str = "") -> None:
    """Raise ``ValueError`` unless the allocation has one entry per decoder layer."""
    n = len(allocation["num_experts"])
    if n != num_layers:
        raise ValueError(
            f"--allocation {path}: has {n} layers but the model has {num_layers} decoder layers"
        )
