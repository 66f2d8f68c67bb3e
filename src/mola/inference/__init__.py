"""Inference tools: routing loads, expert pruning, exact merging into the base weights, the
cache of derived weights the layer's no-grad path uses, and ``torch.compile`` by regions.

Names are imported lazily: :mod:`mola.core.layer` imports :mod:`mola.inference.cache`, so this
package must not import the model code when it is first loaded.
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
    "DerivedWeights": "mola.inference.cache",
    "compile_model": "mola.inference.compiled",
    "compile_regions": "mola.inference.compiled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mola.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
