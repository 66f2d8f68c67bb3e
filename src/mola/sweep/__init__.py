"""``mola sweep``: many training runs from one file, resumable, with a results table.

:func:`load_spec` reads a sweep file (:mod:`mola.sweep.spec`), :func:`run_sweep` trains its runs
(:mod:`mola.sweep.runner`), :func:`write_report` writes ``results.{md,csv,json,png}``
(:mod:`mola.sweep.report`, averaging over seeds with :mod:`mola.sweep.aggregate`).
"""

from mola.sweep.aggregate import Group, group_runs
from mola.sweep.report import write_report
from mola.sweep.runner import RunState, run_state, run_sweep, same_options
from mola.sweep.spec import Run, SweepSpec, load_spec

__all__ = [
    "Group",
    "Run",
    "RunState",
    "SweepSpec",
    "group_runs",
    "load_spec",
    "run_state",
    "run_sweep",
    "same_options",
    "write_report",
]
