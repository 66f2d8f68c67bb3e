"""Analysis of trained adapters: routing statistics, expert redundancy, reports and figures.

``from mola.analysis import analyze, format_summary`` gives the report API; figures live in
:mod:`mola.analysis.plots`.
"""

from mola.analysis.report import *  # noqa: F403
from mola.analysis.report import __all__  # noqa: F401
