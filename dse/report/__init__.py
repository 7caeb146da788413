"""Reports: tables and plots built from formats, energy estimates and sweep results.

For a sweep: `summarize_trials` (mean/std over seeds), `pareto_front` (per task and workload),
`write_reports` (CSV, LaTeX, Markdown and PNG/PDF plots into the output directory) and
`render_table` (one table as text, for `dse export`). Names are imported on first use and plotting
modules import matplotlib on the first figure, so that a module that needs one helper (the sweep's
labels) pays for no more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dse.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from dse.report.files import write_reports
    from dse.report.pareto import all_fronts, pareto_front, workloads_of
    from dse.report.tables import SweepTables, render_table, summarize_trials

_EXPORTS = {
    "write_reports": "dse.report.files", "all_fronts": "dse.report.pareto",
    "pareto_front": "dse.report.pareto", "workloads_of": "dse.report.pareto",
    "SweepTables": "dse.report.tables", "render_table": "dse.report.tables",
    "summarize_trials": "dse.report.tables",
}

__all__ = ["SweepTables", "all_fronts", "pareto_front", "render_table", "summarize_trials", "workloads_of",
           "write_reports"]

__getattr__ = lazy_exports(__name__, _EXPORTS)
