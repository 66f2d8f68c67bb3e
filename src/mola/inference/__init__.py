"""Inference tools: routing loads, expert pruning, exact merging into the base weights."""

from mola.inference.loads import measure_loads
from mola.inference.merge import MergeDecision, fold_modules, merge_plan
from mola.inference.prune import layer_summary, plan_module, prune_model, pruned_patterns

__all__ = [
    "MergeDecision",
    "fold_modules",
    "layer_summary",
    "measure_loads",
    "merge_plan",
    "plan_module",
    "prune_model",
    "pruned_patterns",
]
