"""Reports: tables and plots built from formats, energy estimates and sweep results.

For a sweep: `summarize_trials` (mean/std over seeds), `pareto_front` (per task and workload),
`write_reports` (CSV, LaTeX, Markdown and PNG/PDF plots into the output directory) and
`render_table` (one table as text, for `dse export`). Plotting modules import matplotlib lazily.
"""

from dse.report.files import write_reports
from dse.report.pareto import all_fronts, pareto_front, workloads_of
from dse.report.tables import SweepTables, render_table, summarize_trials

__all__ = ["SweepTables", "all_fronts", "pareto_front", "render_table", "summarize_trials", "workloads_of",
           "write_reports"]
