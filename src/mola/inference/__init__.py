"""Inference tools: routing loads, expert pruning, exact merging into the base weights, input
groups (modules reading the same input run as one) and ``torch.compile`` by regions. The
cache of derived weights the layer's no-grad path uses lives in :mod:`mola.core.cache`
(``DerivedWeights`` is re-exported here).

Names are imported lazily, so importing this package does not load the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "measure_loads": "mola.inference.loads",
    "MergeDecision": "mola.inference.merge",
    "fold_modules": "mola.inference.merge",
    "merge_plan": "mola.inference.merge",
    "layer_summary": "mola.inference.prune",
    "plan_module": "mola.inference.prune",
    "prune_model": "mola.inference.prune",
    "pruned_patterns": "mola.inference.prune",
    "DerivedWeights": "mola.core.cache",
    "compile_model": "mola.inference.compiled",
    "InputGroup": "mola.inference.fused",
    "find_input_groups": "mola.inference.fused",
    "group_inputs": "mola.inference.fused",
    "ungroup_inputs": "mola.inference.fused",
    "compile_regions": "mola.inference.compiled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mola.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
